"""SeTok's stage-1 losses (spec 1.6): pixel reconstruction, PatchGAN hinge terms, and the concept contrast; and
Setokim's mask loss of referring segmentation (spec 2): sigmoid focal + dice + the IoU head's squared error.

These are the loss functions of one forward's inputs and outputs. How they are scheduled across training steps (when
the adversarial term starts, VQGAN's adaptive weight, the discriminator's own step) is the trainer's
(`transformers_setok.training.setok_trainer`)."""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, Siglip2TextModel, SiglipTextModel

from .distributed_setok import gather_contrast_batch, is_distributed
from .mask_decoder_setokim import resize_mask_logits

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


# --------------------------------------------------------------------------------------------------------------------
# Referring segmentation (Setokim's mask decoder)


@dataclass
class MaskLossTerms:
    """Per-object mask loss terms, each `(S,)`: `loss` = focal_weight x `focal` + dice_weight x `dice` + iou_weight x
    `iou` (the IoU head's squared error). Means over objects are the forward's `mask_*_loss`; a trainer that
    normalises over a whole accumulated batch sums these instead."""

    loss: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss of per-pixel logits against targets in [0, 1] (Lin et al., the form of DETR and SAM):
    `alpha_t (1 - p_t)^gamma BCE`, alpha weighting the positive pixels. `(S, H, W)` -> `(S,)`, the mean over pixels.
    Finite for any finite logits (the cross-entropy is taken from the logits)."""
    probabilities = logits.sigmoid()
    cross_entropy = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * cross_entropy).flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss `1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth)`, `(S, H, W)` -> `(S,)`. The smoothing
    term (1, as in DETR) keeps it defined for an empty target: an empty prediction of it then costs ~0."""
    probabilities = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    overlap = 2 * (probabilities * targets).sum(1) + smooth
    return 1 - overlap / (probabilities.sum(1) + targets.sum(1) + smooth)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded prediction (logit > 0) with the target (> 0.5), `(S, H, W)` -> `(S,)`; 1 when both are
    empty."""
    predicted, actual = (logits > 0).flatten(1), (targets > 0.5).flatten(1)
    intersection = (predicted & actual).sum(1).float()
    union = (predicted | actual).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def mask_losses(
    pred_masks: torch.Tensor,
    iou_scores: torch.Tensor,
    target_masks,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> MaskLossTerms:
    """The mask loss of S predictions, at each target's own resolution.

    `pred_masks` `(S, h, w)` logits (resized bilinearly to each target's size), `iou_scores` `(S,)` the IoU head's
    predictions, `target_masks` S float or bool masks `(H_i, W_i)` with values in [0, 1] (a list, or an `(S, H, W)`
    tensor). The IoU head's target is the actual IoU of the thresholded prediction, detached. Computed in float32.
    """
    targets = check_target_masks(target_masks)
    if pred_masks.ndim != 3 or iou_scores.shape != pred_masks.shape[:1] or len(targets) != pred_masks.shape[0]:
        raise ValueError(
            f"`pred_masks` (S, h, w), `iou_scores` (S,) and `target_masks` (S masks) must describe the same objects, "
            f"got {tuple(pred_masks.shape)}, {tuple(iou_scores.shape)} and {len(targets)} masks."
        )
    focal, dice, iou = [], [], []
    # Objects whose targets share a size are resized and scored together.
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, target in enumerate(targets):
        by_size.setdefault(tuple(target.shape), []).append(index)
    order = []
    for size, indices in by_size.items():
        index = torch.tensor(indices, device=pred_masks.device)
        logits = resize_mask_logits(pred_masks[index], size)
        target = torch.stack([targets[i] for i in indices]).to(logits.device, torch.float32)
        focal.append(sigmoid_focal_loss(logits, target, focal_alpha, focal_gamma))
        dice.append(dice_loss(logits, target))
        actual = mask_iou(logits.detach(), target)
        iou.append((iou_scores[index].float() - actual).pow(2))
        order += indices
    if not order:
        empty = pred_masks.new_zeros(0, dtype=torch.float32)
        return MaskLossTerms(loss=empty, focal=empty, dice=empty, iou=empty)
    inverse = torch.argsort(torch.tensor(order, device=pred_masks.device))
    focal, dice, iou = (torch.cat(terms)[inverse] for terms in (focal, dice, iou))
    loss = focal_weight * focal + dice_weight * dice + iou_weight * iou
    return MaskLossTerms(loss=loss, focal=focal, dice=dice, iou=iou)


def check_target_masks(target_masks) -> list[torch.Tensor]:
    """`target_masks` (a list of `(H_i, W_i)` tensors or an `(S, H, W)` tensor) as a list of float tensors, after
    checking each is 2-D, non-empty in size, finite and within [0, 1]; raises naming `target_masks[i]` otherwise."""
    if isinstance(target_masks, torch.Tensor):
        if target_masks.ndim != 3:
            raise ValueError(
                f"`target_masks` must be a list of (H, W) masks or an (S, H, W) tensor, got shape "
                f"{tuple(target_masks.shape)}."
            )
        target_masks = list(target_masks)
    elif not isinstance(target_masks, (list, tuple)):
        raise TypeError(f"`target_masks` must be a list of tensors or a tensor, got {type(target_masks).__name__}.")
    checked = []
    for index, mask in enumerate(target_masks):
        name = f"`target_masks[{index}]`"
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (H, W), got {type(mask).__name__}.")
        if mask.ndim != 2 or mask.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (H, W) mask, got shape {tuple(mask.shape)}.")
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"{name} must be bool or floating point (values in [0, 1]), got {mask.dtype}.")
        mask = mask.float()
        if not torch.isfinite(mask).all() or bool((mask < 0).any()) or bool((mask > 1).any()):
            raise ValueError(f"{name} must hold finite values in [0, 1].")
        checked.append(mask)
    return checked
