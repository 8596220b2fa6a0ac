"""Training batches for Setokim, in two steps because SeTok decides each image's token count only when it runs.

    data worker (CPU, no model)   SetokimChatCollator: chat records -> input_ids / attention_mask / labels with ONE
                                  `<image>` placeholder per image, plus the batch's `pixel_values`
    trainer (model device)        step_inputs.prepare_step: SeTok runs once -> counts n_i -> `model.encode_and_expand`
                                  turns each placeholder into `[Img]`, n_i x `<image>`, `[/Img]` -> `model(**kwargs)`

After the second step input_ids and labels hold every image token, so a loss (or TRL's fused LM head, which pairs
`hidden[:, :-1]` with `labels[:, 1:]`) sees exactly the sequence the LLM reads. The expanded ids are the ones
`SetokimProcessor(text=rendered_chat, image_token_counts=counts)` gives, i.e. what inference feeds the model.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers.utils.chat_template_utils import render_jinja_template

from ..generation.conditions import tokens_in_spans, user_text_spans
from ..modeling.placeholders_setokim import IGNORE_INDEX, expand_image_placeholders

# --------------------------------------------------------------------------------------------------------------------
# Step 1: the collator (CPU, data workers)


def tokenize_conversation(
    processor, messages: list[dict], *, condition_text: bool = False
) -> tuple[list[int], list[int]] | tuple[list[int], list[int], list[bool]]:
    """One chat -> (input_ids, labels), each image still one `<image>` placeholder; with `condition_text=True` also
    one flag per token, True on the user turns' text (`generation.user_text_spans`: what condition dropout removes).

    Labels copy the ids inside the template's `{% generation %}` spans (the assistant turns, their eos included) and
    are IGNORE_INDEX elsewhere: an image in a user turn is an input, an image in an assistant turn a target. The text
    is tokenized exactly as `processor(text=rendered_chat)` would (a BOS is added unless the template wrote one), so
    training sees the ids inference sees.
    """
    tokenizer = processor.tokenizer

    def render(chat):
        texts, spans = render_jinja_template(
            conversations=[chat],
            chat_template=processor.chat_template,
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
        return texts[0], spans[0]

    text, spans = render(messages)
    starts_with_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    encoded = tokenizer(text, add_special_tokens=not starts_with_bos, return_offsets_mapping=True)
    # A token is a target when its characters overlap an assistant span (a BPE token " a" that starts one character
    # early still counts); zero-width tokens (an added BOS) overlap nothing.
    in_assistant_turn = tokens_in_spans(encoded["offset_mapping"], spans)
    # A placeholder inside an assistant turn keeps its id as label: it marks an image the model must draw, whose whole
    # `[Img] ... [/Img]` block `expand_image_placeholders` turns into targets.
    labels = [
        token_id if target else IGNORE_INDEX for token_id, target in zip(encoded["input_ids"], in_assistant_turn)
    ]
    if not condition_text:
        return encoded["input_ids"], labels
    _, text_spans = user_text_spans(lambda chat: render(chat)[0], messages, rendered=text)
    flags = tokens_in_spans(encoded["offset_mapping"], text_spans)
    flags = [flag and token_id != processor.image_token_id for flag, token_id in zip(flags, encoded["input_ids"])]
    return encoded["input_ids"], labels, flags


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, padding_side: str) -> torch.Tensor:
    """Lists of ints of any lengths -> a `(B, T_max)` long tensor, padded with `value` on `padding_side`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    longest = max((len(sequence) for sequence in sequences), default=0)
    padded = torch.full((len(sequences), longest), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence) == 0:
            continue
        if padding_side == "right":
            padded[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        else:
            padded[row, longest - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
    return padded


def _images_of(example: Mapping) -> list:
    """TRL's vision records carry `images` (a list) or `image` (one image)."""
    if example.get("images") is not None:
        return list(example["images"])
    if example.get("image") is not None:
        return [example["image"]]
    return []


def _draws_an_image(messages: list[dict]) -> bool:
    """Whether a chat asks for an image: an image part in an assistant turn."""
    return any(
        message.get("role") == "assistant"
        and not isinstance(message.get("content"), str)
        and any(isinstance(part, dict) and part.get("type") == "image" for part in message.get("content") or [])
        for message in messages
    )


def segmentation_messages(processor, example: Mapping) -> list[dict]:
    """A segmentation record's chat: its request (`messages`, or the processor's `segmentation_request` around
    `expression`), then the assistant's answer, one image placeholder (the object's image block)."""
    if example.get("messages") is not None:
        request = list(example["messages"])
        if not request or request[-1].get("role") != "user":
            raise ValueError("A segmentation record's `messages` must end with the user's request.")
    else:
        request = [{"role": "user", "content": processor.segmentation_request(example.get("expression"))}]
    return request + [{"role": "assistant", "content": [{"type": "image"}]}]


def decode_record_mask(example: Mapping, index: int):
    """A segmentation record's `mask` (any form `training.masks.decode_mask` reads) as a bool `(H, W)` array."""
    from .masks import MaskError, decode_mask

    try:
        return decode_mask(example["mask"])
    except MaskError as error:
        raise ValueError(f"Sample {index}: its `mask` does not decode: {error}") from error


@dataclass
class SetokimChatCollator:
    """Conversational records -> a training batch with one `<image>` placeholder per image (not yet expanded).

    A record is TRL's vision format: `{"images": [PIL images], "messages": [{"role": ..., "content": [{"type":
    "image"} | {"type": "text", "text": ...}]}]}`, one image part per image, in order. Captioning is the same record
    with a user turn holding only the image (and maybe a prompt) and the caption as the assistant turn.

    Returns `input_ids`, `attention_mask`, `labels` (all `(B, T)`; labels are IGNORE_INDEX outside the assistant
    turns and on padding) and, when the batch has images, `pixel_values` `(N_images, 3, H, W)`: the images of all
    samples, sample by sample, in placeholder order. Pass the batch through `step_inputs.prepare_step` before the
    model.

    A referring-segmentation record (`training.data.SEGMENTATION_FEATURES`: one image, an `expression` or
    `messages` ending with the request, and the object's `mask`) becomes the chat "user: <image> Please segment:
    {expression}" (the processor's `segmentation_prompt`) answered by one more placeholder, the object's image block
    whose length `prepare_step` sets from SeTok's clusters. The batch then also holds `segmentation_answers` `(B, T)`
    bool (those answer placeholders), `target_masks` `(S, H, W)` bool (each object's mask at `pixel_values`'
    resolution, transformed with its image) and `mask_image_index` `(S,)` (its image among `pixel_values`).

    When a sample draws an image (an image part in an assistant turn; text-to-image, an edit), the batch also holds
    its condition, which `prepare_step` may drop (classifier-free guidance's training): `condition_text` `(B, T)`
    bool, the tokens of the user turns' text (`generation.user_text_spans`), and `condition_images` `(B, T)` bool,
    the placeholders of the images in its user turns (an edit's source image). Both are False in other samples.

    `max_length` never truncates (that would cut image placeholders or answers): a longer sample is an error. It
    bounds the unexpanded length; `expand_image_placeholders(max_length=...)` and the model check the final one.
    """

    processor: object  # a SetokimProcessor: chat template, tokenizer, image processor, `image_token_id`
    padding_side: str = "right"
    max_length: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {self.padding_side!r}.")
        if self.processor.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token: set `processor.tokenizer.pad_token` (e.g. to its eos).")

    def __call__(self, examples: list[Mapping]) -> dict[str, torch.Tensor]:
        input_ids, labels, answers, images = [], [], [], []
        condition_text, condition_images = [], []  # per token; all False outside samples that draw
        drawing = False
        objects = []  # (image index in the batch, image, mask) of each segmentation record
        for index, example in enumerate(examples):
            segmentation = example.get("mask") is not None
            sample_images = _images_of(example)
            if segmentation and len(sample_images) != 1:
                raise ValueError(
                    f"Sample {index} is a referring-segmentation record (it has a `mask`) with {len(sample_images)} "
                    "images: an expression is segmented in exactly one image."
                )
            messages = segmentation_messages(self.processor, example) if segmentation else example["messages"]
            draws = not segmentation and _draws_an_image(messages)
            drawing |= draws
            ids, sample_labels, *text_flags = tokenize_conversation(self.processor, messages, condition_text=draws)
            self._check_sample(index, ids, sample_labels, len(sample_images) + segmentation)
            # A drawing sample's condition: its user text, and the images of its user turns (an edit's source).
            condition_text.append(text_flags[0] if draws else [False] * len(ids))
            condition_images.append(
                [
                    draws and token == self.processor.image_token_id and label == IGNORE_INDEX
                    for token, label in zip(ids, sample_labels)
                ]
            )
            # The answer's placeholder is the sample's last: the assistant turn that closes the chat holds it.
            answer = [False] * len(ids)
            if segmentation:
                answer[len(ids) - 1 - ids[::-1].index(self.processor.image_token_id)] = True
                objects.append((len(images), sample_images[0], decode_record_mask(example, index)))
            input_ids.append(ids)
            labels.append(sample_labels)
            answers.append(answer)
            images.extend(sample_images)

        batch = {
            "input_ids": pad_sequences(input_ids, self.processor.tokenizer.pad_token_id, self.padding_side),
            "attention_mask": pad_sequences([[1] * len(ids) for ids in input_ids], 0, self.padding_side),
            "labels": pad_sequences(labels, IGNORE_INDEX, self.padding_side),
        }
        if images:
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        if drawing:
            batch["condition_text"] = pad_sequences(condition_text, 0, self.padding_side).bool()
            batch["condition_images"] = pad_sequences(condition_images, 0, self.padding_side).bool()
        if objects:
            batch["segmentation_answers"] = pad_sequences(answers, 0, self.padding_side).bool()
            image_index, object_images, masks = zip(*objects)
            # The object images once more, for their masks' geometry (the same transform as their pixels).
            processed = self.processor.image_processor(list(object_images), masks=list(masks), return_tensors="pt")
            batch["target_masks"] = processed["target_masks"]
            batch["mask_image_index"] = torch.tensor(image_index, dtype=torch.long)
        return batch

    def _check_sample(self, index: int, ids: list[int], labels: list[int], num_images: int):
        num_placeholders = ids.count(self.processor.image_token_id)
        if num_placeholders != num_images:
            raise ValueError(
                f"Sample {index} has {num_placeholders} image parts in its messages but {num_images} images: each "
                "image needs exactly one {'type': 'image'} content part, in the order of `images`."
            )
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(
                f"Sample {index} has {len(ids)} tokens before image expansion, more than max_length={self.max_length}. "
                "Nothing is truncated (it would cut image placeholders or answers): raise max_length, set it to None, "
                "or filter the data set."
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"Sample {index} has no assistant turn: it has nothing to learn from.")


# --------------------------------------------------------------------------------------------------------------------
# Step 2 is `step_inputs.prepare_step` (trainer side): SeTok once, then the expansion the model's `generate` shares.


def encode_and_expand(model, batch, processor_or_ids, *, padding_side: str = "right", max_length: int | None = None):
    """Deprecated: `transformers_setok.training.step_inputs.prepare_step(...).model_kwargs`."""
    import warnings

    from .step_inputs import prepare_step

    warnings.warn(
        "`encode_and_expand` is deprecated: use `prepare_step(model, batch, processor).model_kwargs` "
        "(transformers_setok.training.step_inputs).",
        FutureWarning,
        stacklevel=2,
    )
    step = prepare_step(model, batch, processor_or_ids, padding_side=padding_side, max_length=max_length)
    return dict(step.model_kwargs)


__all__ = [
    "IGNORE_INDEX",
    "SetokimChatCollator",
    "encode_and_expand",
    "expand_image_placeholders",
    "pad_sequences",
    "segmentation_messages",
    "tokenize_conversation",
]
