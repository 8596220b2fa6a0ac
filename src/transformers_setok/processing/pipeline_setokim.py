"""`pipeline("image-text-to-text")` for Setokim: images are encoded once, in `preprocess`.

SeTok decides each image's token count, so the placeholders can be expanded only after SeTok has run. This
subclass of transformers' pipeline runs SeTok in `preprocess`, lets the processor expand the text with those counts,
and hands the features to `generate` through `mm_encoder_outputs` instead of the pixels. Models that do not take
`image_token_counts` (every other model) go through the parent pipeline unchanged.
"""

from transformers.image_utils import load_images
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.pipelines.image_text_to_text import Chat, ImageTextToTextPipeline


class SetokimImageTextToTextPipeline(ImageTextToTextPipeline):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._encodes_images_first() and self.tokenizer is not None:
            self.tokenizer.padding_side = "left"  # batched prompts must end where generation starts

    def _encodes_images_first(self) -> bool:
        return getattr(self.model.config, "model_type", None) == "setokim"

    def preprocess(self, inputs=None, timeout=None, continue_final_message=None, **processing_kwargs):
        images = _images_of(inputs, timeout) if self._encodes_images_first() else []
        if not images:
            return super().preprocess(inputs, timeout, continue_final_message, **processing_kwargs)
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values.to(self.model.device, self.model.dtype))
        counts = [len(image_features) for image_features in features.pooler_output]
        if isinstance(inputs, Chat) or "processor_kwargs" in processing_kwargs:
            processor_kwargs = dict(processing_kwargs.pop("processor_kwargs", None) or {}, image_token_counts=counts)
            processing_kwargs["processor_kwargs"] = processor_kwargs
        else:
            processing_kwargs["image_token_counts"] = counts
        model_inputs = super().preprocess(inputs, timeout, continue_final_message, **processing_kwargs)
        model_inputs.pop("pixel_values", None)
        model_inputs["image_features"] = list(features.pooler_output)  # a list: batching keeps it per sample
        return model_inputs

    def _forward(self, model_inputs, generate_kwargs=None):
        per_sample = model_inputs.pop("image_features", None)
        if per_sample:
            # Batched inputs arrive as one list of per-image features per sample.
            flat = [f for sample in per_sample for f in sample] if isinstance(per_sample[0], list) else per_sample
            encoded = BaseModelOutputWithPooling(pooler_output=flat)
            generate_kwargs = {**(generate_kwargs or {}), "mm_encoder_outputs": {"image": encoded}}
        return super()._forward(model_inputs, generate_kwargs)


def _images_of(inputs, timeout) -> list:
    """The images of one pipeline input, in placeholder order (chat parts, or the `images` of a dict)."""
    if isinstance(inputs, Chat):
        sources = [
            part.get("image", part.get("url", part.get("path")))
            for message in inputs.messages
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if isinstance(part, dict) and part.get("type") == "image"
        ]
        return load_images(sources, timeout=timeout) if sources else []
    if isinstance(inputs, dict) and inputs.get("images") is not None:
        images = inputs["images"]
        return load_images(images if isinstance(images, (list, tuple)) else [images], timeout=timeout)
    return []


__all__ = ["SetokimImageTextToTextPipeline"]
