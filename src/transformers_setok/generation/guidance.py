"""Classifier-free guidance of the generation head (Ho & Salimans 2022; InstructPix2Pix's two-condition form).

The head is trained with its condition sometimes dropped (`SetokimInputsMixin.condition_*_dropout`): the prompt's
text, and for an edit the source image, are removed from the chat. At sampling the head's prediction under the null
condition is pushed away from, towards the full one:

    one condition     uncond + s (cond - uncond)                                      s = 1: cond itself
    text and image    uncond + s_I (image_only - uncond) + s_T (full - image_only)   s_T = s_I = 1: full itself

Both are linear in the predictions, so they apply to a velocity as to a noise prediction.
"""

import math
from numbers import Real

import torch

__all__ = ["check_guidance_scale", "classifier_free_guidance", "instruct_pix2pix_guidance"]


def check_guidance_scale(value, name: str = "guidance_scale") -> float:
    """`value` as a float, or ValueError naming `name`: a guidance scale is a finite real number >= 0 (0 samples
    from the null condition alone, 1 from the full one without guidance)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (1.0: no guidance), got {value!r}.")
    return float(value)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """`uncond + scale * (cond - uncond)`: the predictions under the null and the full condition, any equal shapes."""
    if uncond.shape != cond.shape:
        raise ValueError(f"`uncond` {tuple(uncond.shape)} and `cond` {tuple(cond.shape)} must have the same shape.")
    return uncond + scale * (cond - uncond)


def instruct_pix2pix_guidance(
    uncond: torch.Tensor, image_only: torch.Tensor, full: torch.Tensor, text_scale: float, image_scale: float
) -> torch.Tensor:
    """InstructPix2Pix's guidance for an edit: `uncond + image_scale * (image_only - uncond) + text_scale * (full -
    image_only)`, from the predictions with neither condition, with the source image only, and with both (any equal
    shapes). `image_scale` pulls towards the source image, `text_scale` towards the instruction."""
    if not uncond.shape == image_only.shape == full.shape:
        raise ValueError(
            f"`uncond` {tuple(uncond.shape)}, `image_only` {tuple(image_only.shape)} and `full` {tuple(full.shape)} "
            "must have the same shape."
        )
    return uncond + image_scale * (image_only - uncond) + text_scale * (full - image_only)
