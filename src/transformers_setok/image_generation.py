"""Deprecated path: text-to-image is `transformers_setok.pipelines`, its schedules `transformers_setok.generation`."""

from ._deprecation import warn_moved
from .generation import noise_scheduler_for, revealed_counts
from .pipelines.text_to_image import SetokimImageGenerationOutput, SetokimTextToImagePipeline

warn_moved(__name__, "transformers_setok.pipelines and transformers_setok.generation")

__all__ = ["SetokimImageGenerationOutput", "SetokimTextToImagePipeline", "noise_scheduler_for", "revealed_counts"]
