"""What training and sampling of the generation head share: its noise schedule, MAR's unmasking schedule, where a
chat's condition lies (what condition dropout and the sampler's null condition remove) and classifier-free
guidance.

The schedules need diffusers (an optional dependency) and are imported on first use, so that the collator, which
needs the conditions only, runs without it."""

from .conditions import tokens_in_spans, user_text_spans
from .guidance import check_guidance_scale, classifier_free_guidance, instruct_pix2pix_guidance

__all__ = [
    "check_guidance_scale",
    "classifier_free_guidance",
    "instruct_pix2pix_guidance",
    "noise_scheduler_for",
    "revealed_counts",
    "tokens_in_spans",
    "user_text_spans",
]


def __getattr__(name):
    if name in ("noise_scheduler_for", "revealed_counts"):
        from . import schedule

        return getattr(schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
