"""SeTok's stage-1 losses (spec 1.6): pixel reconstruction, PatchGAN hinge terms, and the concept contrast.

These are the loss functions of one forward's inputs and outputs. How they are scheduled across training steps (when
the adversarial term starts, VQGAN's adaptive weight, the discriminator's own step) is the trainer's
(`transformers_setok.training.setok_trainer`)."""

import math

import torch
from torch import nn
from transformers import AutoModel, Siglip2TextModel, SiglipTextModel

from .distributed_setok import gather_contrast_batch, is_distributed

# AutoModel maps SigLIP's vision towers but not its text towers, the text encoder of the paper.
TEXT_TOWERS = {"siglip_text_model": SiglipTextModel, "siglip2_text_model": Siglip2TextModel}


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L1 or MSE over pixels."""
    if kind == "l1":
        return nn.functional.l1_loss(reconstruction, target)
    return nn.functional.mse_loss(reconstruction, target)


class SetokPatchDiscriminator(nn.Module):
    """PatchGAN discriminator: strided convolutions that score overlapping image patches as real or fake.

    GroupNorm instead of BatchNorm keeps each image's score independent of its batch (and of process count in DDP).
    """

    def __init__(self, channels: int, num_layers: int):
        super().__init__()
        layers = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            next_width = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(1, next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` -> patch logits `(B, 1, h, w)`, float32 like the losses."""
        # The losses hand over float32 images even when the model runs in bf16/fp16.
        return self.layers(pixel_values.to(self.layers[0].weight.dtype)).float()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (nn.functional.relu(1.0 - real_logits).mean() + nn.functional.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def multi_positive_info_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where a row or column may have several positives (multi-label targets).

    `logits` and `positives` are `(B, U)`: images against texts. Each direction is a cross-entropy against the
    uniform distribution over the positives; rows or columns without any positive are left out.
    """
    positives = positives.to(logits.dtype)
    losses = []
    for scores, targets in ((logits, positives), (logits.t(), positives.t())):
        has_positive = targets.sum(-1) > 0
        if has_positive.any():
            targets = targets[has_positive] / targets[has_positive].sum(-1, keepdim=True)
            log_probs = scores[has_positive].log_softmax(-1)
            losses.append(-(targets * log_probs).sum(-1).mean())
    return torch.stack(losses).mean()


class SetokConceptContrast(nn.Module):
    """Concept-level image-text contrast against a frozen text encoder.

    Texts are embedded by the text encoder (mean of the last hidden states over real tokens) and SeTok tokens are
    projected into that space. With `pooling="concept"` an image's score for a phrase is its best-matching token
    (max over tokens): each concept should be carried by one semantic unit. With `pooling="image"` it is the mean of
    the image's tokens against the phrase or caption. The temperature is learned (start 0.07, logit scale clamped).
    Under multi-process training (`config.contrastive_gather`) the images and texts of all processes form one batch.
    """

    def __init__(self, config):
        super().__init__()
        self.pooling = config.concept_pooling
        self.gather = config.contrastive_gather
        self.logit_scale_max = math.log(config.contrastive_logit_scale_max)
        tower = TEXT_TOWERS.get(config.text_config.model_type)
        self.text_encoder = (
            tower._from_config(config.text_config) if tower else AutoModel.from_config(config.text_config)
        )
        self.token_projection = nn.Linear(config.token_dim, config.text_config.hidden_size)
        self.logit_scale = nn.Parameter(torch.empty(()))

    def train(self, mode: bool = True):
        # The frozen text encoder stays in eval mode: its dropout would otherwise make the text targets random.
        super().train(mode)
        self.text_encoder.eval()
        return self

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)

    def forward(self, tokens, token_mask, input_ids, attention_mask, positives) -> torch.Tensor:
        """`tokens` `(B, L, D)`, `token_mask` `(B, L)`, texts `(U, T)`, `positives` `(B, U)` -> scalar loss."""
        texts = nn.functional.normalize(self.embed_texts(input_ids, attention_mask).float(), dim=-1)
        image_side = nn.functional.normalize(self.token_projection(tokens).float(), dim=-1)
        real = token_mask.bool()
        if self.gather and is_distributed():
            image_side, real, texts, positives = gather_contrast_batch(
                image_side, real, texts, input_ids, attention_mask, positives
            )
        if self.pooling == "concept":
            similarity = torch.einsum("bld,ud->blu", image_side, texts)
            similarity = similarity.masked_fill(~real[:, :, None], float("-inf")).amax(1)
        else:
            weights = real[..., None].float()
            pooled = (image_side * weights).sum(1) / weights.sum(1).clamp_min(1)
            similarity = nn.functional.normalize(pooled, dim=-1) @ texts.t()
        scale = self.logit_scale.clamp(max=self.logit_scale_max).exp()
        return multi_positive_info_nce(scale * similarity, positives)
