"""Stage 1: training SeTok's merger, detokenizer and contrastive temperature (spec 1.6) with the `Trainer`.

Who owns which loss: the model computes its forward and the losses that depend only on that forward's inputs and
outputs (reconstruction, perceptual, concept contrast, and the generator's adversarial term against the current
discriminator). Training schedule is the trainer's: when the GAN starts (`disc_start`), VQGAN's adaptive weight of the
adversarial term (through `autograd.grad` at the model's `get_last_layer()`, times `disc_weight`), and the
discriminator's own loss and step. Both come in `SetokTrainingArguments`, beside the Trainer's own arguments.

The generator's loss goes through the Trainer's optimiser. The PatchGAN discriminator has its own optimiser and its
own step, taken after each generator step once `disc_start` is reached. The discriminator's parameters are marked as
not requiring gradients for the whole run, so the Trainer's optimiser, DDP's gradient reduction and gradient clipping
never see them; its step computes their gradients explicitly and averages them across processes.
"""

import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from ..modeling import SetokForImageReconstruction
from ..modeling.losses_setok import hinge_discriminator_loss
from .engines import refuse_engines_turned_off
from .loss_terms import LossTermsMixin

__all__ = [
    "SetokImageTextCollator",
    "SetokTrainer",
    "SetokTrainingArguments",
    "adaptive_adversarial_weight",
    "discriminator_loss",
    "scalar_parameters_as_vectors",
]

logger = logging.get_logger(__name__)

LOSS_TERMS = ("reconstruction_loss", "perceptual_loss", "generator_loss", "concept_loss", "footprint_loss")
DISCRIMINATOR_OPTIMIZER_NAME = "discriminator_optimizer.pt"
DEFAULT_DISC_START = 10000
DEFAULT_DISC_WEIGHT = 0.8


@dataclass
class SetokTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the PatchGAN schedule of stage 1 (used when the model has a discriminator)."""

    disc_start: int = field(
        default=DEFAULT_DISC_START,
        metadata={"help": "Training step from which the adversarial term and the discriminator's own steps run."},
    )
    disc_weight: float = field(
        default=DEFAULT_DISC_WEIGHT,
        metadata={"help": "Multiplier of VQGAN's adaptive weight of the adversarial (generator) term."},
    )
    discriminator_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the discriminator's own AdamW optimiser; defaults to `learning_rate`."},
    )

    def __post_init__(self):
        if isinstance(self.disc_start, bool) or not isinstance(self.disc_start, int) or self.disc_start < 0:
            raise ValueError(f"`disc_start` must be a training step (an integer >= 0), got {self.disc_start!r}.")
        if (
            isinstance(self.disc_weight, bool)
            or not isinstance(self.disc_weight, (int, float))
            or self.disc_weight < 0
        ):
            raise ValueError(f"`disc_weight` must be a number >= 0, got {self.disc_weight!r}.")
        rate = self.discriminator_learning_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise ValueError(f"`discriminator_learning_rate` must be > 0 (or unset), got {rate!r}.")
        super().__post_init__()


def adaptive_adversarial_weight(
    nll_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's balance: ratio of the gradient norms of the two terms at the decoder's last layer (detached).

    SeTok's concept term does not reach the decoder, so the model's whole `loss` can stand for the reconstruction
    side."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def discriminator_loss(
    model: SetokForImageReconstruction,
    pixel_values: torch.Tensor,
    reconstruction: torch.Tensor,
    parameters: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The PatchGAN discriminator's hinge loss: real images (`pixel_values`, brought to the reconstruction's size by
    `model.reconstruction_target`) against the detached `reconstruction`.

    `parameters` (name -> tensor) stand in for the discriminator's own, as in `torch.func.functional_call`: the
    trainer's step differentiates with respect to them while the module's parameters stay frozen."""
    discriminator = model.discriminator
    if discriminator is None:
        raise ValueError("This model has no discriminator: build it with `use_discriminator=True`.")

    def logits(images):
        if parameters is None:
            return discriminator(images)
        return torch.func.functional_call(discriminator, parameters, (images,))

    return hinge_discriminator_loss(logits(model.reconstruction_target(pixel_values)), logits(reconstruction.detach()))


def scalar_parameters_as_vectors(model: nn.Module) -> list[str]:
    """Gives each 0-dim parameter of `model` (SeTok's learned logit scale) the shape `(1,)`, in place (the same
    `nn.Parameter`, so optimisers that hold it still do); returns their names.

    Why: DeepSpeed 0.19 moves parameters as `param.data.view(torch.uint8)` (its initial broadcast under ZeRO-1/2,
    and ZeRO-3's conversion of every parameter), which torch refuses for a 0-dim tensor ("self.dim() cannot be 0 to
    view Float as Byte"). A one-element vector broadcasts against the same tensors in the forward. `SetokTrainer`
    calls this under DeepSpeed only, and saves these parameters back as 0-dim tensors, so its checkpoints load into a
    model built without DeepSpeed.
    """
    names = [name for name, param in model.named_parameters() if param.dim() == 0]
    parameters = dict(model.named_parameters())
    for name in names:
        parameters[name].data = parameters[name].data.reshape(1)
    return names


class SetokImageTextCollator:
    """Image-text records -> a stage-1 batch.

    Records hold `images` (one image), and `concepts` (a list of phrases) and/or `caption`. With `text_source=
    "concepts"` each distinct concept of the batch becomes one text, `template.format(concept)`, positive for every
    image that lists it (the multi-positive contrast); with `"caption"` each distinct caption is one text, positive
    for the images that carry it. Records without texts of that kind are an error: a silent skip would train the
    contrast on fewer images than reported.
    """

    def __init__(self, image_processor, text_tokenizer=None, *, text_source="concepts", template="a photo of a {}"):
        if text_source not in ("concepts", "caption"):
            raise ValueError(f"`text_source` must be 'concepts' or 'caption', got {text_source!r}.")
        self.image_processor = image_processor
        self.text_tokenizer = text_tokenizer
        self.text_source = text_source
        self.template = template

    def __call__(self, records: list[dict]) -> dict:
        images = [_single_image(record, i) for i, record in enumerate(records)]
        batch = {"pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"]}
        if self.text_tokenizer is None:
            return batch
        texts, targets = self._texts_and_targets(records)
        tokens = self.text_tokenizer(texts, padding=True, return_tensors="pt")
        batch.update(
            concept_input_ids=tokens["input_ids"],
            concept_attention_mask=tokens["attention_mask"],
            concept_targets=targets,
        )
        return batch

    def _texts_and_targets(self, records: list[dict]) -> tuple[list[str], torch.Tensor]:
        if self.text_source == "caption":
            per_image = [[record.get("caption")] if record.get("caption") else [] for record in records]
        else:
            per_image = [[self.template.format(c) for c in record.get("concepts") or []] for record in records]
        missing = [i for i, texts in enumerate(per_image) if not texts]
        if missing:
            raise ValueError(
                f"Records {missing} of the batch have no `{self.text_source}` (text_source={self.text_source!r})."
            )
        # Each distinct text once, positive for every image that has it: a copy would be a false negative.
        vocabulary = list(dict.fromkeys(text for texts in per_image for text in texts))
        column = {text: u for u, text in enumerate(vocabulary)}
        targets = torch.zeros(len(records), len(vocabulary))
        for b, texts in enumerate(per_image):
            targets[b, [column[text] for text in texts]] = 1
        return vocabulary, targets


def _single_image(record: dict, index: int):
    images = record.get("images")
    if images is None and "image" in record:
        images = [record["image"]]
    if not isinstance(images, (list, tuple)) or len(images) != 1:
        raise ValueError(f"Record {index} of the batch must hold exactly one image in `images`, got {images!r:.80}.")
    return images[0]


class SetokTrainer(LossTermsMixin, Trainer):
    """`Trainer` for `SetokForImageReconstruction`: logs each loss term and runs the PatchGAN schedule.

    `args` are `SetokTrainingArguments` (plain `TrainingArguments` work too, with the schedule's defaults). From step
    `disc_start` on, the loss is the model's `loss + disc_weight * adaptive weight * generator_loss` and the
    discriminator takes its own step after each generator step: AdamW with betas (0.5, 0.9) like VQGAN, at
    `discriminator_learning_rate` (default: the generator's). Its optimiser state is saved in every checkpoint and
    restored on resume. The resolved schedule is `trainer.disc_start` and `trainer.disc_weight`.

    Compatibility: with plain `TrainingArguments`, a `disc_start`/`disc_weight` still found in the model's config
    (an old config.json, or a YAML `setok_config`) is used, with a FutureWarning; the `discriminator_learning_rate`
    keyword is deprecated in favour of the argument of that name.
    """

    def __init__(self, model=None, args=None, *, discriminator_learning_rate: float | None = None, **kwargs):
        if not isinstance(model, SetokForImageReconstruction):
            raise TypeError(f"`model` must be a SetokForImageReconstruction, got {type(model).__name__}.")
        if args is None:
            args = SetokTrainingArguments(output_dir="tmp_trainer")
        super().__init__(model=model, args=args, **kwargs)
        refuse_engines_turned_off(self)
        self.discriminator = model.discriminator
        self.disc_start, self.disc_weight = self._gan_schedule(model)
        discriminator_learning_rate = self._discriminator_learning_rate(discriminator_learning_rate)
        self.discriminator_optimizer = None
        if self.discriminator is not None:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError(
                    "The PatchGAN discriminator (`use_discriminator=True`) is supported with single-process and DDP "
                    "training; DeepSpeed and FSDP shard its parameters, which its separate step does not handle."
                )
            self.discriminator.requires_grad_(False)
            self.discriminator_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(),
                lr=discriminator_learning_rate or self.args.learning_rate,
                betas=(0.5, 0.9),
                weight_decay=0.0,
            )
        # Under DeepSpeed the 0-dim parameters train as (1,) vectors and are saved in their own shape
        # (see `scalar_parameters_as_vectors`).
        self.scalar_parameters = scalar_parameters_as_vectors(model) if self.is_deepspeed_enabled else []

    def _gan_schedule(self, model) -> tuple[int, float]:
        """(disc_start, disc_weight): the arguments', else what a config written before they moved still holds."""
        legacy = {name: getattr(model.config, name, None) for name in ("disc_start", "disc_weight")}
        legacy = {name: value for name, value in legacy.items() if value is not None}
        if isinstance(self.args, SetokTrainingArguments):
            schedule = {"disc_start": self.args.disc_start, "disc_weight": self.args.disc_weight}
            ignored = {name: value for name, value in legacy.items() if value != schedule[name]}
            if ignored and model.discriminator is not None:
                logger.warning(
                    f"The model's config still holds the deprecated {ignored}: SetokTrainingArguments' {schedule} "
                    "apply."
                )
        else:
            schedule = {"disc_start": DEFAULT_DISC_START, "disc_weight": DEFAULT_DISC_WEIGHT, **legacy}
            if legacy and model.discriminator is not None:
                warnings.warn(
                    f"The GAN schedule {legacy} comes from the model's config, which is deprecated: pass it as "
                    f"SetokTrainingArguments({', '.join(f'{k}={v!r}' for k, v in legacy.items())}, ...).",
                    FutureWarning,
                    stacklevel=3,
                )
        return schedule["disc_start"], schedule["disc_weight"]

    def _discriminator_learning_rate(self, keyword: float | None) -> float | None:
        from_args = getattr(self.args, "discriminator_learning_rate", None)
        if keyword is None:
            return from_args
        if from_args is not None and from_args != keyword:
            raise ValueError(
                f"`discriminator_learning_rate` is given twice: {keyword} to SetokTrainer and {from_args} in its "
                "arguments. Keep the one in SetokTrainingArguments."
            )
        warnings.warn(
            "`SetokTrainer(discriminator_learning_rate=...)` is deprecated: set "
            "`SetokTrainingArguments.discriminator_learning_rate`.",
            FutureWarning,
            stacklevel=3,
        )
        return keyword

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        adversarial = model.training and self.discriminator is not None and self.state.global_step >= self.disc_start
        outputs = model(**inputs, return_generator_loss=adversarial)
        loss = outputs.loss
        if adversarial:
            weight = self.disc_weight
            if weight and torch.is_grad_enabled():
                last_layer = self.accelerator.unwrap_model(model).get_last_layer()
                weight = weight * adaptive_adversarial_weight(outputs.loss, outputs.generator_loss, last_layer)
            loss = loss + weight * outputs.generator_loss
            target = inputs.get("target_pixel_values")
            target = inputs["pixel_values"] if target is None else target
            self._pending_discriminator_inputs = (target, outputs.reconstruction.detach())
        for name in LOSS_TERMS:
            if outputs.get(name) is not None:
                self.record_loss_term(name, outputs[name], model.training)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._pending_discriminator_inputs = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._pending_discriminator_inputs is not None:
            self._discriminator_step(*self._pending_discriminator_inputs)
            self._pending_discriminator_inputs = None
        return loss

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor):
        """One hinge-loss step of the discriminator, accumulated like the generator's gradients and stepped at the
        Trainer's own optimiser steps (before it zeroes the model's gradients, the discriminator's included)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        params = {name: p.detach().requires_grad_() for name, p in self.discriminator.named_parameters()}
        with self.compute_loss_context_manager():
            loss = discriminator_loss(unwrapped, real, fake, parameters=params)
        # The last group of an epoch may hold fewer micro-batches than `gradient_accumulation_steps`.
        grads = torch.autograd.grad(loss / self.current_gradient_accumulation_steps, list(params.values()))
        for param, grad in zip(self.discriminator.parameters(), grads):
            param.grad = grad if param.grad is None else param.grad + grad
        self.record_loss_term("discriminator_loss", loss, training=True)
        if self.accelerator.sync_gradients:
            if self.accelerator.num_processes > 1:
                for param in self.discriminator.parameters():
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")
            if self.args.max_grad_norm:
                nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.args.max_grad_norm)
            self.discriminator_optimizer.step()
            self.discriminator_optimizer.zero_grad(set_to_none=True)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.scalar_parameters:
            # DeepSpeed hands the full state dict (ZeRO-3: gathered on the main process, empty elsewhere).
            state_dict = dict(self.model.state_dict() if state_dict is None else state_dict)
            for name in self.scalar_parameters:
                if name in state_dict:
                    state_dict[name] = state_dict[name].reshape(())
        super()._save(output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.discriminator_optimizer is not None and self.args.should_save:
            torch.save(
                self.discriminator_optimizer.state_dict(), os.path.join(output_dir, DISCRIMINATOR_OPTIMIZER_NAME)
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.discriminator_optimizer is None:
            return
        path = os.path.join(checkpoint, DISCRIMINATOR_OPTIMIZER_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint {checkpoint!r} has no {DISCRIMINATOR_OPTIMIZER_NAME} to resume from.")
        self.discriminator_optimizer.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
