"""Image placeholders at the token-id level: where they are, and their expansion to `[Img] <image> x n [/Img]`.

SeTok decides each image's token count n_i only when it runs, so a prompt reaches the model in one of two forms:

    unexpanded   ... <image> ...                      one placeholder per image (what a plain prompt holds)
    expanded     ... [Img] <image> x n_i [/Img] ...   what the LLM reads (the processor writes it when given counts)

Training (`encode_and_expand`) and `SetokimForConditionalGeneration.generate` both expand with
`expand_image_placeholders`; `image_blocks` tells the two forms apart. Pure tensor code on any device.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the label value PyTorch's and transformers' cross-entropy skip


@dataclass
class ImageBlocks:
    """The image placeholders of a batch, in placeholder order (row by row, left to right).

    `num_unexpanded[b]`: bare `<image>` tokens of row b (not inside an `[Img] ... [/Img]` block).
    `expanded_counts[b]`: the `<image>` count of each `[Img] ... [/Img]` block of row b, in order.
    """

    num_unexpanded: list[int]
    expanded_counts: list[list[int]]

    @property
    def any_unexpanded(self) -> bool:
        return any(self.num_unexpanded)

    @property
    def any_expanded(self) -> bool:
        return any(self.expanded_counts)


def image_blocks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    image_token_id: int,
    boi_token_id: int,
    eoi_token_id: int,
) -> ImageBlocks:
    """Reads the placeholders of `input_ids` `(B, T)` (padding, where `attention_mask` is 0, ignored).

    An `<image>` between `[Img]` and `[/Img]` belongs to an expanded block; any other is an unexpanded placeholder.
    A block still open at the end of a row is an image being drawn and is not counted. An `[Img]` inside a block, or
    a `[/Img]` without its `[Img]`, is an error.
    """
    rows = input_ids.tolist()
    masks = attention_mask.tolist() if attention_mask is not None else [[1] * len(row) for row in rows]
    num_unexpanded, expanded_counts = [], []
    for index, (row, mask) in enumerate(zip(rows, masks)):
        bare, blocks, open_block = 0, [], None
        for token, real in zip(row, mask):
            if not real:
                continue
            if token == boi_token_id:
                if open_block is not None:
                    raise ValueError(f"Row {index} of `input_ids` opens an image block (`[Img]`) inside another one.")
                open_block = 0
            elif token == eoi_token_id:
                if open_block is None:
                    raise ValueError(f"Row {index} of `input_ids` closes an image block (`[/Img]`) it never opened.")
                blocks.append(open_block)
                open_block = None
            elif token == image_token_id:
                if open_block is None:
                    bare += 1
                else:
                    open_block += 1
        # A block still open at the end of a row is an image the model is drawing (the text-to-image prompt ends in
        # `[Img]`): its `<image>` tokens are targets, with no input image behind them.
        num_unexpanded.append(bare)
        expanded_counts.append(blocks)
    return ImageBlocks(num_unexpanded=num_unexpanded, expanded_counts=expanded_counts)


def _check_counts(image_token_counts, num_placeholders: int, device: torch.device) -> torch.Tensor:
    """Counts as a `(P,)` long tensor, after checking there is one positive integer per placeholder."""
    counts = torch.as_tensor(image_token_counts, device=device)
    if counts.numel() == 0:
        counts = counts.long()  # torch.as_tensor([]) is a float tensor
    if counts.ndim != 1 or counts.numel() != num_placeholders:
        raise ValueError(
            f"The batch has {num_placeholders} image placeholders but {counts.numel()} image token counts were given: "
            "pass one count per image, in placeholder order across the batch."
        )
    if counts.dtype == torch.bool or counts.is_floating_point() or counts.is_complex() or bool((counts < 1).any()):
        raise ValueError(f"Image token counts must be positive integers, got {counts.tolist()}.")
    return counts.long()


def expand_image_placeholders(
    batch: Mapping[str, torch.Tensor],
    image_token_counts: Sequence[int] | torch.Tensor,
    *,
    image_token_id: int,
    boi_token_id: int,
    eoi_token_id: int,
    pad_token_id: int,
    padding_side: str,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Replaces the i-th `<image>` placeholder of the batch (row by row, left to right) by `[Img]`, n_i image
    tokens, `[/Img]`, where n_i = `image_token_counts[i]`, and re-pads the batch on `padding_side`.

    `batch`: `input_ids` `(B, T)`, optional `attention_mask` `(B, T)` (all ones when missing) and `labels` `(B, T)`.
    Returns a new dict with `input_ids`, `attention_mask` (and `labels`) of shape `(B, T')`, T' the longest
    expanded row: labels keep their text targets aligned and are IGNORE_INDEX on padding and on the whole block of an
    input image (markers included). The block of a target image (its placeholder labelled with its own id, see
    `tokenize_conversation`) is labelled with its tokens: the LLM learns to open it, its length, and to close it. `position_ids` are dropped (stale after expansion; the
    model derives positions itself); other keys pass through untouched. `max_length`, if given, bounds T'.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    num_rows, num_cols = input_ids.shape
    device = input_ids.device

    real = attention_mask.bool()
    placeholders = (input_ids == image_token_id) & real
    counts = _check_counts(image_token_counts, int(placeholders.sum()), device)

    # Each input token becomes `width` output tokens: 1 for text, n_i + 2 for an image block, 0 for padding
    # (re-padded below). Boolean indexing walks row by row, left to right: the placeholder order.
    widths = real.long()
    widths[placeholders] = counts + 2
    lengths = widths.sum(1)  # (B,) expanded lengths
    new_len = int(lengths.max()) if num_rows else 0
    if max_length is not None and new_len > max_length:
        row = int(lengths.argmax())
        raise ValueError(
            f"Sample {row} has {new_len} tokens once its images are expanded (image tokens included), more than "
            f"max_length={max_length}. Nothing is truncated: raise max_length or filter the data set."
        )

    # One output token per (source token, k) pair, k = 0..width-1, all computed at once:
    # `source` indexes the flattened (B * T) input, `k` is the position inside that token's output span.
    flat_widths = widths.flatten()
    source = torch.repeat_interleave(torch.arange(flat_widths.numel(), device=device), flat_widths)
    global_starts = flat_widths.cumsum(0) - flat_widths
    k = torch.arange(source.numel(), device=device) - global_starts[source]
    row = source // num_cols
    column = (widths.cumsum(1) - widths).flatten()[source] + k  # output column, before padding
    if padding_side == "left":
        column = column + (new_len - lengths)[row]

    is_image = placeholders.flatten()[source]
    tokens = input_ids.flatten()[source]  # text tokens copy themselves; image blocks are rebuilt below
    tokens = torch.where(is_image & (k == 0), boi_token_id, tokens)
    tokens = torch.where(is_image & (k == flat_widths[source] - 1), eoi_token_id, tokens)

    expanded = {key: value for key, value in batch.items() if key != "position_ids"}
    expanded["input_ids"] = input_ids.new_full((num_rows, new_len), pad_token_id)
    expanded["input_ids"][row, column] = tokens
    expanded["attention_mask"] = attention_mask.new_zeros((num_rows, new_len))
    expanded["attention_mask"][row, column] = 1
    if batch.get("labels") is not None:
        labels = batch["labels"]
        expanded["labels"] = labels.new_full((num_rows, new_len), IGNORE_INDEX)
        source_labels = labels.flatten()[source]
        is_input_image = is_image & (source_labels != image_token_id)
        expanded["labels"][row, column] = torch.where(
            is_input_image, IGNORE_INDEX, torch.where(is_image, tokens, source_labels)
        )
    return expanded


__all__ = ["IGNORE_INDEX", "ImageBlocks", "expand_image_placeholders", "image_blocks"]
