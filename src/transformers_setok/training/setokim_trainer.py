"""Stage 2: pretraining Setokim's projector, new token rows and generation head on caption data with the `Trainer`
(spec 3).

What trains (the spec's table; upstream froze its own projector here by mistake):
- the projector, always;
- the rows of the new tokens (`<image>`, `[Img]`, `[/Img]`) in the input embeddings and in an untied LM head, and
  nothing else of the LLM, unless `train_language_model=True` trains the whole LLM;
- the generation head, with `train_generation_head=True` (the model needs one: `config.use_generation_head`);
- never SeTok (stage 1 trained it) nor its detokenizer inside Setokim (`image_decoder`).

Captioning chats train understanding; text-to-image chats (the image in the assistant turn) train generation: the
LLM learns to write `[Img]`, the image's length and `[/Img]` (cross-entropy), and the head learns to denoise the
hidden tokens from the LLM's hidden states (MSE, see `generation_targets`). Both kinds may share a batch.

Only some rows of the embedding matrix may move, so its gradient is masked to those rows while training, and the
matrix is kept out of weight decay: with a zero gradient AdamW leaves a row exactly where it was, but decay would
still shrink it.
"""

import json
import os

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .._checks import check_positive_int
from ..generation import noise_scheduler_for
from ..modeling import SetokimForConditionalGeneration
from .engines import refuse_engines_turned_off
from .generation_targets import ConditionDropout, estimate_token_scale
from .loss_terms import LossTermsMixin
from .step_inputs import DiffusionSettings, SetokimStepInputs, prepare_step

__all__ = ["SetokimInputsMixin", "SetokimPretrainTrainer", "loss_weight"]

logger = logging.get_logger(__name__)


class SetokimInputsMixin(LossTermsMixin):
    """Prepares each micro-batch once per optimizer step (`step_inputs.prepare_step`: SeTok once per image, each
    `<image>` expanded to its own token count, the generation head's inputs), then forms the loss.

    The collator cannot know the counts (only SeTok does), so batches arrive with one placeholder per image and
    `pixel_values`. `get_batch_samples` prepares the step's micro-batches before the Trainer counts their labels, so
    the loss normaliser counts the expanded labels (an image to draw is n + 2 labelled tokens where the collator wrote
    one placeholder) and the model, the Trainer's loss and TRL's metrics all see the expanded `input_ids` and
    `labels`. Images in assistant turns are generation targets: the loss is then the LM loss plus
    `diffusion_loss_weight` x the head's MSE, logged as `diffusion_loss`. Referring-segmentation records add
    `mask_loss_weight` x the mask decoder's loss (its own 20 x focal + dice + IoU terms, `config.mask_*_weight`), a
    mean over the objects of the whole accumulated step on all processes, logged as `mask_loss` and its three terms.
    With `condition_*_dropout` above 0, training steps drop the condition of some drawing samples (the text of the
    chat, an edit's source image), drawn with the step's generator: the null condition of classifier-free guidance.
    """

    generation_mask_ratio_min: float = 0.7  # MAR: 70-100 % of a target image's tokens hidden
    # Classifier-free guidance's training (InstructPix2Pix's three cases, see `ConditionDropout`): per drawing sample
    # of a training step, the probability that its user text alone, its source image alone (an edit), or both are
    # dropped from its chat. Evaluation drops nothing.
    condition_text_dropout: float = 0.0
    condition_image_dropout: float = 0.0
    condition_both_dropout: float = 0.0
    diffusion_noise_repeats: int = 4  # noise draws per hidden token (MAR's diffusion batch multiplier)
    diffusion_loss_weight: float = 1.0
    mask_loss_weight: float = 1.0

    def _check_requested_engine(self):
        """Called at the end of `__init__`: see `engines.refuse_engines_turned_off`."""
        refuse_engines_turned_off(self)

    def _set_generation_training(
        self,
        model,
        *,
        train_generation_head: bool,
        generation_mask_ratio_min: float,
        diffusion_noise_repeats: int,
        diffusion_loss_weight: float,
        condition_text_dropout: float,
        condition_image_dropout: float,
        condition_both_dropout: float,
    ):
        """Checks and keeps the generation head's training settings, the same in stages 2 and 3 (`model`: the
        Setokim itself, not a wrapper). Called before the base trainer's `__init__`, so a bad value fails first."""
        if train_generation_head and model.generation_head is None:
            raise ValueError(
                "`train_generation_head=True` needs a model with a generation head (`config.use_generation_head`; "
                "`transformers_setok.add_generation_head` adds one)."
            )
        ratio = generation_mask_ratio_min
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"`generation_mask_ratio_min` must lie in [0, 1], got {ratio!r}.")
        check_positive_int(diffusion_noise_repeats, "diffusion_noise_repeats")
        self.train_generation_head = bool(train_generation_head)
        self.generation_mask_ratio_min = float(ratio)
        self.diffusion_noise_repeats = diffusion_noise_repeats
        self.diffusion_loss_weight = loss_weight(diffusion_loss_weight, "diffusion_loss_weight")
        self.condition_text_dropout = condition_text_dropout
        self.condition_image_dropout = condition_image_dropout
        self.condition_both_dropout = condition_both_dropout
        self._condition_dropout()  # checks the three probabilities now rather than at the first step

    def _settle_token_scale(self, model, dataset, collator):
        """With `train_generation_head`, a model whose `config.generation_token_scale` is not set gets it from the
        training images (`estimate_token_scale`); a set one is part of what the head learnt and stays."""
        if not self.train_generation_head or model.config.generation_token_scale is not None:
            return
        if dataset is None:
            raise ValueError(
                "`train_generation_head=True` for a model without `config.generation_token_scale`: the scale is "
                "estimated from `train_dataset`, which is not given (pass it, or set the model's scale)."
            )
        model.config.generation_token_scale = estimate_token_scale(model, dataset, collator)
        logger.info(
            "Generation token scale (1 / std of the training images' tokens): %.4g",
            model.config.generation_token_scale,
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        batch_samples = [self._prepare_inputs(batch) for batch in batch_samples]
        others_read_images = self._images_on_any_process(batch_samples, num_batches, device)
        with self.compute_loss_context_manager():
            prepared = [
                self.prepare_step(self.model, batch, others_read_images=others, micro_batch=i)
                for i, (batch, others) in enumerate(zip(batch_samples, others_read_images))
            ]
        num_items_in_batch = super()._get_num_items_in_batch([step.model_kwargs for step in prepared], device)
        drawn = [step.diffusion for step in prepared if step.diffusion is not None]
        objects = sum(step.num_objects for step in prepared)
        if drawn or objects or self.accelerator.num_processes > 1:
            # The step's drawn tokens and referred objects on all processes, in one reduction: the normalisers of
            # the diffusion and mask losses.
            totals = torch.tensor([float(sum(t.num_target_tokens for t in drawn)), float(objects)], device=device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            for targets in drawn:
                targets.step_target_tokens = float(totals[0])
            for step in prepared:
                step.step_objects = float(totals[1])
        return prepared, num_items_in_batch

    def _images_on_any_process(self, batch_samples, num_batches, device) -> list[bool]:
        """For each micro-batch of the step: whether any process has images in its micro-batch at that place. One
        all-reduce per step (none on one process); `prepare_step` then runs SeTok on a blank image where this process
        has none but another has, so that every process runs the same collectives (ZeRO-3 and FSDP gather SeTok's and
        the projector's parameters; DDP and ZeRO-2 reduce the projector's gradient)."""
        has_images = [batch.get("pixel_values") is not None for batch in batch_samples]
        if self.accelerator.num_processes == 1:
            return [False] * len(batch_samples)
        flags = torch.zeros(max(num_batches, len(batch_samples)), device=device)
        flags[: len(has_images)] = torch.tensor(has_images, dtype=flags.dtype)
        flags = self.accelerator.reduce(flags, reduction="sum")
        return [bool(flags[i] > 0) for i in range(len(batch_samples))]

    def _prepare_inputs(self, inputs):
        if isinstance(inputs, SetokimStepInputs):
            return inputs  # prepared on the model's device by `get_batch_samples`
        return super()._prepare_inputs(inputs)

    def prepare_step(
        self, model, inputs, others_read_images: bool = False, micro_batch: int | None = None
    ) -> SetokimStepInputs:
        """`step_inputs.prepare_step` with this trainer's collator, processor and generation settings. `micro_batch`:
        the batch's place in the optimizer step being prepared (`get_batch_samples`); None for a batch outside
        training (evaluation, a direct `compute_loss`). It picks the masks' and noise's generator (see
        `_diffusion_generator`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if self.is_fsdp_enabled:
            _register_image_features_with_fsdp(unwrapped)
        collator = self.data_collator
        return prepare_step(
            unwrapped,
            inputs,
            self.processing_class,
            padding_side=getattr(collator, "padding_side", "right"),
            max_length=getattr(collator, "max_length", None),
            diffusion=self._diffusion_settings(unwrapped, training=micro_batch is not None),
            generator=self._diffusion_generator(micro_batch),
            others_read_images=others_read_images,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = inputs if isinstance(inputs, SetokimStepInputs) else self.prepare_step(model, inputs)
        segments = "segmentation_prompts" in step.model_kwargs
        if step.diffusion is None and not segments and not self._has_heads(model):
            return super().compute_loss(
                model, step.model_kwargs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # The model's own forward, which runs its heads on the LLM's hidden states: a fused LM loss (TRL's, stage 3)
        # calls the backbone alone, so neither the generation head nor the mask decoder would run. The LM loss is the
        # same sum over the labelled tokens, divided by the step's count (`num_items_in_batch`).
        loss, outputs = Trainer.compute_loss(
            self, model, step.model_kwargs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        scaled = model.training and self._lm_loss_scaled_for_accumulation(num_items_in_batch)
        if step.diffusion is not None:
            targets = step.diffusion
            errors = (outputs.diffusion_prediction.float() - targets.target.float()).pow(2).mean(-1)  # one per row
            error_sum = (targets.weights * errors).sum()  # each target token of this micro-batch counted once
            local_mean = error_sum / targets.weights.sum()
            self.record_loss_term("diffusion_loss", local_mean, model.training, weight=targets.weights.sum())
            loss = loss + self.diffusion_loss_weight * self._step_share(
                local_mean, error_sum, targets.step_target_tokens, scaled
            )
        if segments and outputs.mask_loss is not None:
            for name in ("mask_loss", "mask_focal_loss", "mask_dice_loss", "mask_iou_loss"):
                self.record_loss_term(name, getattr(outputs, name), model.training, weight=step.num_objects)
            mask_sum = outputs.mask_loss * step.num_objects
            loss = loss + self.mask_loss_weight * self._step_share(
                outputs.mask_loss, mask_sum, step.step_objects, scaled
            )
        return (loss, outputs) if return_outputs else loss

    def _has_heads(self, model) -> bool:
        """Whether the model has a mask decoder or a generation head. Its steps then all take the model's own forward,
        also those without objects or images to draw: the path must be the same on every process, since each runs
        collectives (TRL's metric gathers on its path; the idle heads and the prompt statistics of the mask decoder
        on the other), and a process with nothing for a head in a step may sit beside one that has."""
        unwrapped = self.accelerator.unwrap_model(model)
        return (
            getattr(unwrapped, "mask_decoder", None) is not None
            or getattr(unwrapped, "generation_head", None) is not None
        )

    def _step_share(self, local_mean, local_sum, step_total, scaled: bool):
        """Like the LM loss: with the Trainer's accumulation scaling, this micro-batch's share of the mean over the
        whole accumulated step on all processes (the Trainer neither divides by the micro-batches nor DDP's average
        undoes the processes); otherwise the micro-batch's own mean."""
        if scaled and step_total:
            return local_sum / step_total * self.accelerator.num_processes
        return local_mean

    def _lm_loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        # Mirrors the Trainer's own test in `training_step`.
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Prepared here, so that the labels returned next to the logits are the expanded ones.
        step = (
            inputs if isinstance(inputs, SetokimStepInputs) else self.prepare_step(model, self._prepare_inputs(inputs))
        )
        return super().prediction_step(model, step, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluation_loop(self, *args, **kwargs):
        self._evaluation_draws = 0  # every evaluation draws the same masks and noise for the same batch
        return super().evaluation_loop(*args, **kwargs)

    def _diffusion_generator(self, micro_batch: int | None) -> torch.Generator:
        """The generator of one batch's masks, noise and timesteps, seeded from `args.seed`, the process index and
        the batch's place: in training the optimizer step (`state.global_step`) and the `micro_batch` of that step;
        otherwise the batch's place in the current evaluation (so every evaluation draws alike and its loss is
        comparable from one checkpoint to the next).

        Not from the global RNG, deliberately: resuming mid-epoch, the Trainer restores the checkpoint's RNG state
        only after `get_batch_samples` has fetched (and so prepared) the first resumed step. A seed drawn from the
        global RNG would then differ from the uninterrupted run's, and drawing it would shift the global RNG (and so
        dropout) of one run against the other. Seeded from the step, a resumed run draws what the uninterrupted one
        drew, whenever the Trainer restores its RNG; the process index gives every process its own draws."""
        if micro_batch is None:
            place = [1, getattr(self, "_evaluation_draws", 0)]
            self._evaluation_draws = place[1] + 1
        else:
            place = [0, self.state.global_step, micro_batch]
        words = [self.args.seed % 2**32, self.accelerator.process_index, *place]
        low, high = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).tolist()
        return torch.Generator().manual_seed(high << 32 | low)

    def _diffusion_settings(self, model, training: bool = False) -> DiffusionSettings | None:
        """The generation settings of one batch; `training`: a batch of a training step, whose conditions may be
        dropped (an evaluation's never are, so its loss is the conditional one)."""
        if getattr(model, "generation_head", None) is None:
            return None
        if getattr(self, "_diffusion_scheduler", None) is None:
            self._diffusion_scheduler = noise_scheduler_for(model.config)
        return DiffusionSettings(
            scheduler=self._diffusion_scheduler,
            token_scale=model.config.generation_token_scale or 1.0,
            mask_ratio_min=self.generation_mask_ratio_min,
            noise_repeats=self.diffusion_noise_repeats,
            condition_dropout=self._condition_dropout() if training else None,
        )

    def _condition_dropout(self) -> ConditionDropout:
        return ConditionDropout(
            text=self.condition_text_dropout, image=self.condition_image_dropout, both=self.condition_both_dropout
        )


class SetokimPretrainTrainer(SetokimInputsMixin, Trainer):
    """`Trainer` for stage 2. `processing_class` must be the `SetokimProcessor`; `new_token_ids` default to the
    config's image, `[Img]` and `[/Img]` ids. `generation_mask_ratio_min`, `diffusion_noise_repeats` and
    `diffusion_loss_weight` set the generation loss, `condition_text_dropout`, `condition_image_dropout` and
    `condition_both_dropout` the condition dropout of classifier-free guidance (see `SetokimInputsMixin`)."""

    def __init__(
        self,
        model=None,
        args=None,
        *,
        train_language_model: bool = False,
        train_generation_head: bool = False,
        new_token_ids: list[int] | None = None,
        generation_mask_ratio_min: float = 0.7,
        diffusion_noise_repeats: int = 4,
        diffusion_loss_weight: float = 1.0,
        condition_text_dropout: float = 0.0,
        condition_image_dropout: float = 0.0,
        condition_both_dropout: float = 0.0,
        **kwargs,
    ):
        if not isinstance(model, SetokimForConditionalGeneration):
            raise TypeError(f"`model` must be a SetokimForConditionalGeneration, got {type(model).__name__}.")
        if kwargs.get("processing_class") is None:
            raise ValueError("`processing_class` must be the model's SetokimProcessor (it expands the placeholders).")
        self._set_generation_training(
            model,
            train_generation_head=train_generation_head,
            generation_mask_ratio_min=generation_mask_ratio_min,
            diffusion_noise_repeats=diffusion_noise_repeats,
            diffusion_loss_weight=diffusion_loss_weight,
            condition_text_dropout=condition_text_dropout,
            condition_image_dropout=condition_image_dropout,
            condition_both_dropout=condition_both_dropout,
        )
        config = model.config
        self.train_language_model = train_language_model
        self.new_token_ids = sorted(
            set(new_token_ids or (config.image_token_id, config.boi_token_id, config.eoi_token_id))
        )
        vocab = model.get_input_embeddings().weight.shape[0]
        if not all(0 <= i < vocab for i in self.new_token_ids):
            raise ValueError(f"`new_token_ids` must lie in [0, {vocab}), got {self.new_token_ids}.")
        self._select_trainable_parameters(model)
        super().__init__(model=model, args=args, **kwargs)
        self._check_requested_engine()
        self._settle_token_scale(model, self.train_dataset, self.data_collator)
        if not train_language_model and (self.is_fsdp_enabled or _zero_stage(self.accelerator) == 3):
            raise ValueError(
                "Training only the new token rows masks the embedding gradient per row, which FSDP and DeepSpeed "
                "ZeRO-3 (sharded parameters) bypass: use DDP or ZeRO-1/2, or `train_language_model=True`."
            )

    def _restore_token_scale(self, checkpoint: str):
        # The token scale is part of what the head learnt: a resumed run keeps the checkpoint's, not a new estimate.
        config_file = os.path.join(checkpoint, "config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as file:
                scale = json.load(file).get("generation_token_scale")
            if scale is not None:
                self.accelerator.unwrap_model(self.model).config.generation_token_scale = scale

    def _row_trained_matrices(self, model) -> list[torch.nn.Parameter]:
        """The embedding matrix and an untied LM head (one tensor when tied)."""
        matrices = {id(p): p for p in (model.get_input_embeddings().weight, model.lm_head.weight)}
        return list(matrices.values())

    def _select_trainable_parameters(self, model):
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        if self.train_generation_head:
            model.generation_head.requires_grad_(True)
        if self.train_language_model:
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
        else:
            for matrix in self._row_trained_matrices(model):
                matrix.requires_grad_(True)

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.train_language_model:
            return names
        matrices = {id(p) for p in self._row_trained_matrices(self.accelerator.unwrap_model(model))}
        return [name for name, p in model.named_parameters() if name in names and id(p) not in matrices]

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):  # read here: DeepSpeed and FSDP resume without the model hooks
            self._restore_token_scale(os.fspath(checkpoint))
        handles = []
        if not self.train_language_model:
            model = self.accelerator.unwrap_model(self.model)
            for matrix in self._row_trained_matrices(model):
                keep = torch.zeros(matrix.shape[0], 1, dtype=matrix.dtype, device=matrix.device)
                keep[self.new_token_ids] = 1
                handles.append(matrix.register_hook(lambda grad, keep=keep: grad * keep))
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def loss_weight(value, name: str) -> float:
    """A loss term's weight: a finite number >= 0 (else ValueError naming `name`), as a float."""
    # The chained comparison is False for NaN too.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return float(value)


def _register_image_features_with_fsdp(model):
    """SeTok and the projector run in `get_image_features`, outside the model's forward (see `step_inputs`). FSDP 2
    gathers the root's own parameters (the projector's among them) only around a forward: registered, the method
    gathers them too (a no-op for a model that is not an FSDP module)."""
    if getattr(model, "_setokim_fsdp_image_features", False):
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, "get_image_features")
    model._setokim_fsdp_image_features = True


def _zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None
