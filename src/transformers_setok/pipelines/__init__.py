"""Pipelines: each calls only the public methods of the models it holds (as diffusers pipelines do).

Understanding needs no pipeline of its own: transformers' `pipeline("image-text-to-text")` runs Setokim.
Referring segmentation is a transformers `Pipeline` (it ships as remote code with exported checkpoints);
text-to-image and image editing are diffusers `DiffusionPipeline`s (sharing their sampler, `_sampling`), imported on
first use, since diffusers is an optional dependency.
"""

from .referring_segmentation import SEGMENTATION_TASK, SetokimReferringSegmentationPipeline

__all__ = [
    "SEGMENTATION_TASK",
    "SetokimImageEditingPipeline",
    "SetokimImageGenerationOutput",
    "SetokimReferringSegmentationPipeline",
    "SetokimTextToImagePipeline",
]


def __getattr__(name):
    if name in ("SetokimImageGenerationOutput", "SetokimTextToImagePipeline"):
        from . import text_to_image

        return getattr(text_to_image, name)
    if name == "SetokimImageEditingPipeline":
        from . import image_editing

        return image_editing.SetokimImageEditingPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
