"""Processor of Setokim: SeTok's image processor and the LLM's tokenizer.

SeTok decides each image's token count, so the count exists only after SeTok has run. Two flows:

    inputs = processor(images=images, text=prompts, return_tensors="pt")   # one `<image>` per image, unexpanded
    model.generate(**inputs)        # SeTok runs once inside generate, which expands the placeholders itself

    features = model.get_image_features(**processor.image_processor(images, return_tensors="pt"))
    inputs = processor(text=prompts, images=images, image_token_counts=[len(f) for f in features.pooler_output])
    model(**inputs, mm_encoder_outputs={"image": features})   # expanded here; what forward and training need

`SetokimForConditionalGeneration.prepare_inputs(processor, text, images)` does the second in one call.
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


# How a referring expression is asked for (training chats and the segmentation pipeline alike); `{expression}` is
# replaced by it. The answer is the object's image block, `[Img] <image> x m [/Img]`.
DEFAULT_SEGMENTATION_PROMPT = "Please segment: {expression}"


def _check_segmentation_prompt(prompt) -> None:
    if not isinstance(prompt, str) or "{expression}" not in prompt:
        raise ValueError(f"`segmentation_prompt` must be a text holding '{{expression}}', got {prompt!r}.")


class SetokimProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: SetokImagesKwargs
    _defaults = {"text_kwargs": {"padding": False}}


class SetokimProcessor(ProcessorMixin):
    r"""
    Holds a [`SetokImageProcessor`] and the LLM's tokenizer.

    With `image_token_counts` (n_i, the SeTok token count of each image, in placeholder order), each `image_token`
    in the text is expanded to `image_block(n_i)`: `boi_token`, `image_token` x n_i, `eoi_token`. Without them, the
    placeholders stay one `image_token` per image, which `SetokimForConditionalGeneration.generate` expands after
    encoding the images. The tokenizer gets the three special tokens added when it lacks them (resize the LLM's
    embeddings to `len(processor.tokenizer)` afterwards).
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
        segmentation_prompt: str = DEFAULT_SEGMENTATION_PROMPT,
        **kwargs,
    ):
        missing = [token for token in (image_token, boi_token, eoi_token) if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        self.image_token, self.boi_token, self.eoi_token = image_token, boi_token, eoi_token
        _check_segmentation_prompt(segmentation_prompt)
        self.segmentation_prompt = segmentation_prompt
        self.image_token_id, self.boi_token_id, self.eoi_token_id = tokenizer.convert_tokens_to_ids(
            [image_token, boi_token, eoi_token]
        )
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

    def image_block(self, num_tokens: int) -> str:
        """The text of one image of `num_tokens` SeTok tokens: `[Img]`, `<image>` x num_tokens, `[/Img]`."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"An image's token count must be a positive integer, got {num_tokens!r}.")
        return self.boi_token + self.image_token * num_tokens + self.eoi_token

    def segmentation_request(self, expression: str) -> list[dict]:
        """The user turn's content that asks to segment `expression` in the turn's image: the image part, then
        `segmentation_prompt` with the expression filled in."""
        if not isinstance(expression, str) or not expression.strip():
            raise ValueError(f"`expression` must be a non-empty text, got {expression!r}.")
        text = self.segmentation_prompt.replace("{expression}", expression.strip())
        return [{"type": "image"}, {"type": "text", "text": text}]

    def replace_image_token(self, image_inputs: dict, image_idx: int, image_token_counts=None, **kwargs) -> str:
        if image_token_counts is None:
            return self.image_token  # left for `generate` to expand once SeTok has run
        num_images = len(image_inputs["pixel_values"])
        if len(image_token_counts) != num_images:
            raise ValueError(f"`image_token_counts` has {len(image_token_counts)} entries for {num_images} images.")
        count = image_token_counts[image_idx]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"`image_token_counts` must hold positive integers, got {count!r}.")
        return self.image_block(count)

    def validate_inputs(self, images=None, text=None, **kwargs):
        super().validate_inputs(images=images, text=text, **kwargs)
        # transformers checks the total only: with one list of images per prompt, each prompt must hold its own.
        nested = isinstance(images, (list, tuple)) and images and all(isinstance(g, (list, tuple)) for g in images)
        prompts = [text] if isinstance(text, str) else text
        if not nested or prompts is None:
            return
        if len(images) != len(prompts):
            raise ValueError(f"`images` holds {len(images)} lists of images for {len(prompts)} prompts in `text`.")
        for index, (group, prompt) in enumerate(zip(images, prompts)):
            found = prompt.count(self.image_token)
            if found != len(group):
                raise ValueError(
                    f"Prompt {index} of `text` holds {found} {self.image_token} placeholders but `images[{index}]` "
                    f"holds {len(group)} images."
                )

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
