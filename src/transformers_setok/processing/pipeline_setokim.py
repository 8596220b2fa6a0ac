"""Deprecated: `pipeline("image-text-to-text")` needs no Setokim subclass any more.

`SetokimForConditionalGeneration.generate` takes the stock pipeline's inputs (one `<image>` per image and
`pixel_values`), encodes the images once and expands the placeholders itself, so transformers' own
`ImageTextToTextPipeline` runs Setokim as it runs any VLM. This alias goes away in the next release.
"""

import warnings

from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline


class SetokimImageTextToTextPipeline(ImageTextToTextPipeline):
    def __init__(self, *args, **kwargs):
        warnings.warn(
            "`SetokimImageTextToTextPipeline` is deprecated: use `pipeline('image-text-to-text', model=...)`, "
            "transformers' own pipeline runs Setokim.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)


__all__ = ["SetokimImageTextToTextPipeline"]
