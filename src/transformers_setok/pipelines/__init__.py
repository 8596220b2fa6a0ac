"""Pipelines: each calls only the public methods of the models it holds (as diffusers pipelines do).

Understanding needs no pipeline of its own: transformers' `pipeline("image-text-to-text")` runs Setokim.
"""

from .text_to_image import SetokimImageGenerationOutput, SetokimTextToImagePipeline

__all__ = ["SetokimImageGenerationOutput", "SetokimTextToImagePipeline"]
