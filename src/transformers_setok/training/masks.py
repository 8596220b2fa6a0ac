"""Referring-segmentation masks: decode the forms data sets store them in, check them, and store them compactly.

A mask comes in one of three forms, all decoded by `decode_mask` to a bool array `(H, W)`, True on the object:

* a binary image: a path to a PNG (or any file PIL reads), a PIL image, or a numpy array / torch tensor `(H, W)`.
  Its values must be {0, 1} (bool, or integers) or {0, 255} (8-bit masks as PNGs save them); a PNG that holds one
  grey level per pixel in three identical RGB channels is read as grey. Anything else is refused, with the values
  found.
* COCO polygons: a list of flat lists `[x1, y1, x2, y2, ...]` in pixel coordinates (x right, y down), one list per
  part of the object; the mask is their union. They are rasterised with `PIL.ImageDraw` at the image's size, edges
  included (fill and outline both set a pixel). This is PIL's rasteriser, not COCO's (`pycocotools`), so pixels on
  a polygon's edge can differ from COCO's own masks; the interior is the same.
* COCO RLE: `{"size": [h, w], "counts": ...}`, run lengths over the pixels in column-major order (down the first
  column, then the next), starting with a run of zeros (0 when the first pixel is on). `counts` is a list of ints
  (COCO's uncompressed RLE, used for crowd annotations) or a string (compressed; bytes are read as ASCII): each
  count is written in 5-bit groups, least significant first, each group as the character `48 + group`, where bit
  0x20 of the group means "another group follows" and bit 0x10 of the last group is the sign; from the third count
  on, what is written is the difference from the count two places before.

`validate_mask(mask, image_size)` decodes any form and checks it against its image: not empty, of the image's size.
Every problem raises `MaskError`, whose `reason` names the kind of problem (the data loaders count skipped records
by it). `encode_rle` writes a mask as compressed RLE, the form the segmentation records store (`data.py`).
"""

import os

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ..processing.image_processing_setok import InvalidMaskError, to_binary_mask

__all__ = ["MaskError", "decode_mask", "decode_rle_counts", "encode_rle", "encode_rle_counts", "validate_mask"]

_ZERO = ord("0")  # the compressed counts' characters start at '0' (48): a 6-bit group g is chr(48 + g)


class MaskError(InvalidMaskError):
    """A mask that cannot be used. `where` (optional) names the record or argument, `reason` the kind of problem,
    `detail` the specifics."""

    def __init__(self, reason: str, detail: str = "", where=None):
        super().__init__(reason, detail)
        if where is not None:
            self.args = (f"{where}: {self.args[0]}",)
        self.where = where


def validate_mask(mask, image_size, where=None) -> np.ndarray:
    """Decode `mask` (any form `decode_mask` reads) and check it against its image of `image_size` =
    `(height, width)`: the same size, and at least one pixel on. Returns the mask, bool `(height, width)`.

    `where` (a record's place or an argument's name) opens every error message."""
    height, width = _checked_size(image_size)
    try:
        decoded = decode_mask(mask, image_size=(height, width))
    except MaskError as error:
        raise MaskError(error.reason, error.detail, where) from error
    if decoded.shape != (height, width):
        raise MaskError(
            "mask size mismatch",
            f"the mask is {decoded.shape[0]} x {decoded.shape[1]} (height x width), its image {height} x {width}",
            where,
        )
    if not decoded.any():
        raise MaskError("empty mask", "no pixel of the mask is on", where)
    return decoded


def decode_mask(mask, image_size=None) -> np.ndarray:
    """Any supported form of a mask -> bool `(H, W)` (see the module docstring).

    `image_size` = `(height, width)` is needed for polygons (the canvas they are drawn on) and ignored otherwise:
    the other forms carry their own size. Emptiness and size are not checked here (`validate_mask` does)."""
    if isinstance(mask, dict):
        return decode_rle(mask)
    if isinstance(mask, (list, tuple)):
        if image_size is None:
            raise MaskError("bad polygon", "polygons need the image size to be drawn on (`image_size`)")
        return decode_polygons(mask, _checked_size(image_size))
    if isinstance(mask, (str, os.PathLike)):
        return _decode_image_file(os.fspath(mask))
    if isinstance(mask, (PIL.Image.Image, np.ndarray)) or type(mask).__module__.startswith("torch"):
        return _decode_binary_image(mask)
    raise MaskError(
        "unknown mask form",
        "expected an image (path, PIL image, array), COCO polygons (a list of [x1, y1, ...] lists) or a COCO RLE "
        f"dict, got a {type(mask).__name__}",
    )


def _decode_image_file(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise MaskError("missing mask file", path)
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return _decode_binary_image(image)
    except MaskError as error:
        raise MaskError(error.reason, f"{path}: {error.detail}") from error
    except Exception as error:  # PIL signals a broken file with many exception types
        raise MaskError("unreadable mask file", f"{path}: {error or type(error).__name__}") from error


def _decode_binary_image(image) -> np.ndarray:
    try:
        return to_binary_mask(image)
    except InvalidMaskError as error:
        raise MaskError(error.reason, error.detail) from error


# --- Polygons ---


def decode_polygons(polygons, image_size: tuple[int, int]) -> np.ndarray:
    """COCO polygons (a list of flat `[x1, y1, x2, y2, ...]` lists) -> bool `(height, width)`, their union."""
    height, width = image_size
    if not polygons:
        raise MaskError("bad polygon", "an empty list of polygons")
    canvas = PIL.Image.new("L", (width, height), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    for number, polygon in enumerate(polygons):
        if not isinstance(polygon, (list, tuple)) or not all(_is_number(value) for value in polygon):
            raise MaskError("bad polygon", f"polygon {number} is not a flat list of coordinates: {_short(polygon)}")
        if len(polygon) % 2:
            raise MaskError("bad polygon", f"polygon {number} has an odd number of coordinates ({len(polygon)})")
        if len(polygon) < 6:
            raise MaskError("bad polygon", f"polygon {number} has {len(polygon) // 2} points; a polygon needs 3")
        if not all(np.isfinite(float(value)) for value in polygon):
            raise MaskError("bad polygon", f"polygon {number} has a coordinate that is not finite")
        points = [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon), 2)]
        draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas) == 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# --- RLE ---


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE dict (`size` `[h, w]`, `counts` a list of ints or a compressed string) -> bool `(h, w)`."""
    if "size" not in rle or "counts" not in rle:
        raise MaskError("bad RLE", f"an RLE is a dict with 'size' and 'counts', got keys {sorted(rle)}")
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_count(value) for value in size):
        raise MaskError("bad RLE", f"'size' must be [height, width], got {_short(size)}")
    height, width = (int(value) for value in size)
    if height <= 0 or width <= 0:
        raise MaskError("bad RLE", f"'size' must be positive, got [{height}, {width}]")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = decode_rle_counts(counts)
    elif not isinstance(counts, (list, tuple)) or not all(_is_count(value) for value in counts):
        raise MaskError("bad RLE", f"'counts' must be a string or a list of ints, got {_short(counts)}")
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise MaskError("bad RLE", f"negative run length {int(counts[counts < 0][0])}")
    if counts.sum() != height * width:
        raise MaskError(
            "bad RLE",
            f"the counts sum to {int(counts.sum())}, not to height x width = {height} x {width} = {height * width}",
        )
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True  # runs alternate, zeros first
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T.copy()  # column-major: the flat runs go down each column in turn


def _is_count(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def decode_rle_counts(text) -> list[int]:
    """COCO's compressed `counts` string -> run lengths (see the module docstring for the encoding)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as error:
            raise MaskError("bad RLE", f"compressed counts must be ASCII: {error.reason}") from error
    counts: list[int] = []
    value = shift = 0
    for position, char in enumerate(text):
        group = ord(char) - _ZERO
        if not 0 <= group < 64:
            raise MaskError("bad RLE", f"character {char!r} at {position} is outside the encoding's '0'..'o'")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue  # more groups of this count follow
        if group & 0x10:
            value -= 1 << shift  # the last group's top bit is the sign: extend it
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value = shift = 0
    if shift:
        raise MaskError("bad RLE", "the compressed counts end inside a count (a last character with bit 0x20 set)")
    return counts


def encode_rle_counts(counts) -> str:
    """Run lengths -> COCO's compressed `counts` string (the inverse of `decode_rle_counts`)."""
    chars = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        while True:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: a negative value ends at -1
            more = value != (-1 if group & 0x10 else 0)
            chars.append(chr(_ZERO + (group | (0x20 if more else 0))))
            if not more:
                break
    return "".join(chars)


def encode_rle(mask) -> dict:
    """A binary mask (bool `(H, W)`, or any form `decode_mask` reads without an image size) -> COCO compressed RLE
    `{"size": [H, W], "counts": str}`."""
    mask = mask if isinstance(mask, np.ndarray) and mask.dtype == bool and mask.ndim == 2 else decode_mask(mask)
    flat = mask.T.reshape(-1)  # column-major
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)  # the runs start with zeros, of which there are none
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": encode_rle_counts(counts)}


# --- Arguments ---


def _checked_size(image_size) -> tuple[int, int]:
    if (
        not isinstance(image_size, (list, tuple))
        or len(image_size) != 2
        or not all(_is_count(value) and value > 0 for value in image_size)
    ):
        raise ValueError(f"`image_size` must be (height, width), two positive ints, got {image_size!r}.")
    return int(image_size[0]), int(image_size[1])


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
