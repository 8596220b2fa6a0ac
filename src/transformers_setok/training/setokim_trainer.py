"""Stage 2: pretraining Setokim's projector and new token rows on caption data with the `Trainer` (spec 3).

What trains (the spec's table; upstream froze its own projector here by mistake):
- the projector, always;
- the rows of the new tokens (`<image>`, `[Img]`, `[/Img]`) in the input embeddings and in an untied LM head, and
  nothing else of the LLM, unless `train_language_model=True` trains the whole LLM;
- never SeTok, which stage 1 trained.

Only some rows of the embedding matrix may move, so its gradient is masked to those rows while training, and the
matrix is kept out of weight decay: with a zero gradient AdamW leaves a row exactly where it was, but decay would
still shrink it.
"""

import torch
from transformers import Trainer

from ..modeling import SetokimForConditionalGeneration
from .collators import encode_and_expand

__all__ = ["SetokimInputsMixin", "SetokimPretrainTrainer"]


class SetokimInputsMixin:
    """Runs SeTok once per image and expands each `<image>` to its own token count before the loss is computed.

    The collator cannot know the counts (only SeTok does), so batches arrive with one placeholder per image and
    `pixel_values`; the model, the Trainer's loss and TRL's metrics then see the expanded `input_ids` and `labels`.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self._encode_and_expand(model, inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Expanded here, so that the labels returned next to the logits are the expanded ones.
        inputs = self._encode_and_expand(model, inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _encode_and_expand(self, model, inputs):
        if "mm_encoder_outputs" in inputs:  # already expanded (prediction_step, then compute_loss)
            return inputs
        collator = self.data_collator
        return encode_and_expand(
            self.accelerator.unwrap_model(model),
            inputs,
            self.processing_class,
            padding_side=getattr(collator, "padding_side", "right"),
            max_length=getattr(collator, "max_length", None),
        )


class SetokimPretrainTrainer(SetokimInputsMixin, Trainer):
    """`Trainer` for stage 2. `processing_class` must be the `SetokimProcessor`; `new_token_ids` default to the
    config's image, `[Img]` and `[/Img]` ids."""

    def __init__(
        self,
        model=None,
        args=None,
        *,
        train_language_model: bool = False,
        new_token_ids: list[int] | None = None,
        **kwargs,
    ):
        if not isinstance(model, SetokimForConditionalGeneration):
            raise TypeError(f"`model` must be a SetokimForConditionalGeneration, got {type(model).__name__}.")
        if kwargs.get("processing_class") is None:
            raise ValueError("`processing_class` must be the model's SetokimProcessor (it expands the placeholders).")
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
        if not train_language_model and (self.is_fsdp_enabled or _zero_stage(self.accelerator) == 3):
            raise ValueError(
                "Training only the new token rows masks the embedding gradient per row, which FSDP and DeepSpeed "
                "ZeRO-3 (sharded parameters) bypass: use DDP or ZeRO-1/2, or `train_language_model=True`."
            )

    def _row_trained_matrices(self, model) -> list[torch.nn.Parameter]:
        """The embedding matrix and an untied LM head (one tensor when tied)."""
        matrices = {id(p): p for p in (model.get_input_embeddings().weight, model.lm_head.weight)}
        return list(matrices.values())

    def _select_trainable_parameters(self, model):
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
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

    def train(self, *args, **kwargs):
        handles = []
        if not self.train_language_model:
            model = self.accelerator.unwrap_model(self.model)
            for matrix in self._row_trained_matrices(model):
                keep = torch.zeros(matrix.shape[0], 1, dtype=matrix.dtype, device=matrix.device)
                keep[self.new_token_ids] = 1
                handles.append(matrix.register_hook(lambda grad, keep=keep: grad * keep))
        try:
            return super().train(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def _zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None
