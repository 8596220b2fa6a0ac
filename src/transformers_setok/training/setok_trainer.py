"""Stage 1: training SeTok's merger, detokenizer and contrastive temperature (spec 1.6) with the `Trainer`.

The generator side (reconstruction, perceptual, adversarial and concept terms) is the model's own loss and goes
through the Trainer's optimiser. The PatchGAN discriminator has its own optimiser and its own step, taken by
`SetokTrainer` after each generator step once `config.disc_start` is reached. The discriminator's parameters are
marked as not requiring gradients for the whole run, so the Trainer's optimiser, DDP's gradient reduction and
gradient clipping never see them; its step computes their gradients explicitly and averages them across processes.
"""

import os

import torch
from torch import nn
from transformers import Trainer

from ..modeling import SetokForImageReconstruction
from ..modeling.losses_setok import hinge_discriminator_loss
from .loss_terms import LossTermsMixin

__all__ = ["SetokImageTextCollator", "SetokTrainer"]

LOSS_TERMS = ("reconstruction_loss", "perceptual_loss", "generator_loss", "concept_loss")
DISCRIMINATOR_OPTIMIZER_NAME = "discriminator_optimizer.pt"


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
    """`Trainer` for `SetokForImageReconstruction`: logs each loss term and runs the PatchGAN discriminator.

    `discriminator_learning_rate` defaults to the generator's; the discriminator uses AdamW with betas (0.5, 0.9)
    like VQGAN. Its optimiser state is saved in every checkpoint and restored on resume.
    """

    def __init__(self, model=None, args=None, *, discriminator_learning_rate: float | None = None, **kwargs):
        if not isinstance(model, SetokForImageReconstruction):
            raise TypeError(f"`model` must be a SetokForImageReconstruction, got {type(model).__name__}.")
        super().__init__(model=model, args=args, **kwargs)
        self.discriminator = model.discriminator
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, global_step=self.state.global_step)
        for name in LOSS_TERMS:
            if outputs.get(name) is not None:
                self.record_loss_term(name, outputs[name], model.training)
        if model.training and outputs.get("generator_loss") is not None:
            target = inputs.get("target_pixel_values", inputs["pixel_values"])
            self._pending_discriminator_inputs = (target, outputs.reconstruction.detach())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

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

            def logits(images):
                return torch.func.functional_call(self.discriminator, params, (images,))

            loss = hinge_discriminator_loss(logits(unwrapped._target(real, None)), logits(fake))
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
