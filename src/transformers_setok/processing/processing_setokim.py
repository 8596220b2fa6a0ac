"""Processor of Setokim: SeTok's image processor and the LLM's tokenizer.

SeTok decides each image's token count, so the count exists only after SeTok has run. The processor therefore
expands placeholders from counts it is given (`image_token_counts`), and the flow is:

    features = model.get_image_features(**processor.image_processor(images, return_tensors="pt"))
    inputs = processor(text=prompts, images=images, image_token_counts=[len(f) for f in features.pooler_output])
    model.generate(**inputs, mm_encoder_outputs={"image": features})   # SeTok does not run a second time

`SetokimForConditionalGeneration.prepare_inputs(processor, text, images)` does exactly this in one call.
"""

from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_processing_setok import SetokImagesKwargs, _is_array


def _is_image(value) -> bool:
    return _is_array(value) or type(value).__module__.startswith("PIL")


# One image block per image; the assistant turn is wrapped for assistant-only loss.
DEFAULT_CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "Assistant: {% generation %}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ render(message['content']) }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


class SetokimProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: SetokImagesKwargs
    _defaults = {"text_kwargs": {"padding": False}}


class SetokimProcessor(ProcessorMixin):
    r"""
    Holds a [`SetokImageProcessor`] and the LLM's tokenizer.

    Each `image_token` in the text is expanded to `boi_token`, `image_token` x n_i, `eoi_token`, where n_i is the
    image's SeTok token count passed as `image_token_counts`. The tokenizer gets the three special tokens added when
    it lacks them (resize the LLM's embeddings to `len(processor.tokenizer)` afterwards).
    """

    valid_processor_kwargs = SetokimProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = "<image>",
        boi_token: str = "[Img]",
        eoi_token: str = "[/Img]",
        **kwargs,
    ):
        missing = [token for token in (image_token, boi_token, eoi_token) if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        self.image_token, self.boi_token, self.eoi_token = image_token, boi_token, eoi_token
        self.image_token_id, self.boi_token_id, self.eoi_token_id = tokenizer.convert_tokens_to_ids(
            [image_token, boi_token, eoi_token]
        )
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, image_token_counts=None, **kwargs) -> str:
        num_images = len(image_inputs["pixel_values"])
        if image_token_counts is None:
            raise ValueError(
                "`image_token_counts` is required with images: SeTok decides each image's token count. Run "
                "`model.get_image_features(...)` first, or use `model.prepare_inputs(processor, text, images)`."
            )
        if len(image_token_counts) != num_images:
            raise ValueError(f"`image_token_counts` has {len(image_token_counts)} entries for {num_images} images.")
        count = image_token_counts[image_idx]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"`image_token_counts` must hold positive integers, got {count!r}.")
        return self.boi_token + self.image_token * count + self.eoi_token

    def __call__(self, images=None, text=None, **kwargs):
        for image in _flat(images):
            if not (isinstance(image, str) or _is_image(image)):
                raise TypeError(
                    f"`images` must be PIL images, numpy arrays, torch tensors, paths or URLs, got {type(image).__name__}."
                )
        return super().__call__(images=images, text=text, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        if not conversation or (isinstance(conversation, (list, tuple)) and not all(conversation)):
            raise ValueError("`conversation` is empty: pass at least one message.")
        return super().apply_chat_template(conversation, *args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


def _flat(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for group in images for image in _flat(group)]
    return [images]


__all__ = ["SetokimProcessor"]
