"""Where a chat's condition lies in its rendering: what condition dropout removes in training
(`training.collators.SetokimChatCollator`, `training.step_inputs.prepare_step`) and what the sampler removes to build
its null condition (`pipelines.text_to_image`), found the same way in both so that the two nulls are one.

The condition of an image to draw is the text of the user turns (and, for an edit, the source image, whose
placeholder the collator finds by its label). The text is located in the chat template's rendering by rendering the
chat once more with each user text replaced by a marker: the pieces between the markers are the template's own,
and the rendering must be those pieces with the texts in between. A token is a condition token when its characters
overlap a text's span, the rule `tokenize_conversation` applies to assistant spans.
"""

import re
from collections.abc import Callable, Sequence

__all__ = ["tokens_in_spans", "user_text_spans"]

# A marker no text holds (a NUL byte) and a template leaves alone (no letters a case filter changes).
_MARKER = "\x00{}\x00"
_MARKERS = re.compile("\x00(\\d+)\x00")


def user_text_spans(
    render: Callable[[list[dict]], str], messages: list[dict], rendered: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """`render(messages)` and the `(start, end)` character spans in it of the user turns' texts (text parts and
    string contents that are not empty), in order.

    `render` is the chat template's rendering of a chat (the same call for both renderings); `rendered`, if the
    caller has it already, is `render(messages)`. A template that repeats, drops or reorders a user text, or changes
    it beyond stripping its ends, has no span to give: ValueError.
    """
    if rendered is None:
        rendered = render(messages)
    texts, marked = [], []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "user":
            marked.append(message)
            continue
        content = message.get("content")
        if isinstance(content, str):
            if content:
                texts.append(content)
                content = _MARKER.format(len(texts) - 1)
        elif isinstance(content, Sequence):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and part.get("text"):
                    texts.append(part["text"])
                    part = {**part, "text": _MARKER.format(len(texts) - 1)}
                parts.append(part)
            content = parts
        marked.append({**message, "content": content})
    if not texts:
        return rendered, []
    if any("\x00" in text for text in texts):
        raise ValueError("A user text holds a NUL character, which locating the condition text relies on.")

    pieces = _MARKERS.split(render(marked))  # template text, marker index, template text, ...
    order = [int(index) for index in pieces[1::2]]
    if order != list(range(len(texts))):
        raise ValueError(
            "The chat template does not render each user text once and in order, so the condition text (which "
            f"condition dropout and guidance remove) cannot be located in the rendering (found {order})."
        )
    templated = pieces[0::2]
    if not rendered.startswith(templated[0]):
        raise _changed_text_error()
    spans, position = [], len(templated[0])
    for text, following in zip(texts, templated[1:]):
        # A template may strip the content (Llama 3's `| trim`); anything else is refused.
        for candidate in dict.fromkeys((text, text.strip())):
            if rendered.startswith(candidate + following, position):
                spans.append((position, position + len(candidate)))
                position += len(candidate) + len(following)
                break
        else:
            raise _changed_text_error()
    if position != len(rendered):
        raise _changed_text_error()
    return rendered, spans


def _changed_text_error() -> ValueError:
    return ValueError(
        "The chat template changes the user's text (beyond stripping it) or renders it differently from one chat to "
        "the next, so the condition text cannot be located in the rendering."
    )


def tokens_in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """One flag per token of character `offsets` (a tokenizer's `offset_mapping`): True where the token's characters
    overlap one of `spans`. A zero-width token (an added BOS) overlaps nothing."""
    return [any(start < end_ and end > start_ for start_, end_ in spans) for start, end in offsets]
