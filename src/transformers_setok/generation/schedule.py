"""The generation head's schedules (spec 2), one definition for training (`training/generation_targets.py`) and
sampling (`pipelines/text_to_image.py`).

- The noise schedule: a diffusers `DDPMScheduler` built from the model's `SetokimConfig` (cosine by default, 1000
  training steps, v-prediction).
- The unmasking schedule: how many of an image's tokens are drawn after each round (MAR's cosine schedule).
"""

import math

from diffusers import DDPMScheduler


def noise_scheduler_for(config) -> DDPMScheduler:
    """The DDPM schedule of a Setokim's generation head, from its `SetokimConfig` (no clipping: SeTok tokens are not
    bounded like pixels)."""
    return DDPMScheduler(
        num_train_timesteps=config.diffusion_num_train_timesteps,
        beta_schedule=config.diffusion_beta_schedule,
        prediction_type=config.diffusion_prediction_type,
        clip_sample=False,
    )


def revealed_counts(num_tokens: int, num_rounds: int) -> list[int]:
    """How many of `num_tokens` tokens are drawn after each of `num_rounds` rounds: MAR's cosine schedule, at least one
    more per round until all are drawn."""
    counts, known = [], 0
    for k in range(1, num_rounds + 1):
        target = num_tokens - math.floor(num_tokens * math.cos(math.pi / 2 * k / num_rounds))
        known = min(num_tokens, max(known + 1, target))
        counts.append(known)
    counts[-1] = num_tokens
    return counts
