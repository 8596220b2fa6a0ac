"""Masks in every form a referring-segmentation data set stores them (PNG, COCO polygons, COCO RLE) decode to the
same bool array, and each kind of bad mask is refused with its reason."""

import numpy as np
import PIL.Image
import pytest

from transformers_setok.training.masks import (
    MaskError,
    decode_mask,
    decode_rle_counts,
    encode_rle,
    encode_rle_counts,
    validate_mask,
)

# A shape whose polygon rasterises to a known mask: the axis-aligned rectangle rows 2..5, columns 3..8 (PIL fills a
# polygon's interior and, with an outline, its edge pixels).
HEIGHT, WIDTH = 9, 12
RECTANGLE = [3, 2, 8, 2, 8, 5, 3, 5]


def rectangle_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[2:6, 3:9] = True
    return mask


def simple_rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of `mask` in column-major order, zeros first: a pixel-by-pixel loop, independent of the
    vectorised encoder under test."""
    counts, current, run = [], False, 0
    for column in range(mask.shape[1]):
        for row in range(mask.shape[0]):
            if bool(mask[row, column]) != current:
                counts.append(run)
                current, run = not current, 0
            run += 1
    counts.append(run)
    return counts


@pytest.fixture
def horse() -> np.ndarray:
    from skimage import data

    return ~data.horse()  # a black horse on white: inverted, the horse is True


def test_png_polygon_and_rle_of_the_same_shape_decode_equal(tmp_path):
    expected = rectangle_mask()
    path = tmp_path / "mask.png"
    PIL.Image.fromarray(expected.astype(np.uint8) * 255).save(path)
    forms = {
        "png path": path,
        "PIL image": PIL.Image.open(path),
        "0/1 array": expected.astype(np.uint8),
        "polygon": [RECTANGLE],
        "uncompressed RLE": {"size": [HEIGHT, WIDTH], "counts": simple_rle_counts(expected)},
        "compressed RLE": {"size": [HEIGHT, WIDTH], "counts": encode_rle_counts(simple_rle_counts(expected))},
    }
    for name, form in forms.items():
        np.testing.assert_array_equal(decode_mask(form, image_size=(HEIGHT, WIDTH)), expected, err_msg=name)


def test_real_shape_round_trips_through_every_form(tmp_path, horse):
    path = tmp_path / "horse.png"
    PIL.Image.fromarray(horse).save(path)  # mode "1"
    uncompressed = {"size": list(horse.shape), "counts": simple_rle_counts(horse)}
    assert sum(uncompressed["counts"]) == horse.size
    for form in (
        path,
        uncompressed,
        encode_rle(horse),
        {"size": list(horse.shape), "counts": encode_rle(horse)["counts"].encode()},
    ):
        np.testing.assert_array_equal(decode_mask(form), horse)
    assert decode_rle_counts(encode_rle(horse)["counts"]) == uncompressed["counts"]


def test_hand_written_compressed_rle():
    # A 3 x 4 mask, column-major runs [1, 2, 3, 1, 5]: 1 off, 2 on, 3 off, 1 on, 5 off. Written by hand in COCO's
    # encoding: '1', '2', '3' are the first three counts (chr(48 + n)); from the fourth on the difference to the
    # count two before is written: 1 - 2 = -1 is the 5-bit group 0b11111 with its sign bit 0x10 set: chr(48 + 31)
    # = 'O'; then 5 - 3 = 2: '2'.
    assert decode_rle_counts("123O2") == [1, 2, 3, 1, 5]
    # Column 0 top to bottom: off, on, on; column 1: off x 3; column 2: on, off, off; column 3: off x 3.
    expected = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(decode_mask({"size": [3, 4], "counts": "123O2"}), expected)
    # A count of 40 needs two groups: 40 = 8 + 1 * 32: 8 with the "more" bit 0x20: chr(48 + 40) = 'X', then '1'.
    assert decode_rle_counts("X1") == [40]
    assert encode_rle_counts([1, 2, 3, 1, 5]) == "123O2" and encode_rle_counts([40]) == "X1"


def test_mask_that_starts_on_has_a_leading_zero_run():
    mask = np.ones((2, 2), dtype=bool)
    mask[1, 1] = False
    assert decode_rle_counts(encode_rle(mask)["counts"]) == [0, 3, 1]
    np.testing.assert_array_equal(decode_mask(encode_rle(mask)), mask)


def test_polygons_are_a_union_and_need_the_image_size():
    second = [0, 7, 1, 7, 1, 8, 0, 8]  # the 2 x 2 block at rows 7..8, columns 0..1
    expected = rectangle_mask()
    expected[7:9, 0:2] = True
    np.testing.assert_array_equal(decode_mask([RECTANGLE, second], image_size=(HEIGHT, WIDTH)), expected)
    with pytest.raises(MaskError, match="image size"):
        decode_mask([RECTANGLE])


def test_validate_mask_accepts_and_returns_the_mask(horse):
    np.testing.assert_array_equal(validate_mask(horse.astype(np.uint8) * 255, horse.shape), horse)


@pytest.mark.parametrize(
    "mask, reason, message",
    [
        (np.zeros((HEIGHT, WIDTH), dtype=bool), "empty mask", "no pixel"),
        (np.ones((HEIGHT, WIDTH + 1), dtype=bool), "mask size mismatch", "is 9 x 13 .* its image 9 x 12"),
        (np.full((HEIGHT, WIDTH), 7, dtype=np.uint8), "bad mask values", r"found 1 distinct: 7"),
        (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) % 3, "bad mask values", "found 3 distinct: 0, 1, 2"),
        (np.ones((HEIGHT, WIDTH, 2)), "bad mask shape", r"\(9, 12, 2\)"),
        ({"size": [HEIGHT, WIDTH], "counts": [5, 5]}, "bad RLE", "sum to 10, not to .* = 108"),
        ({"size": [HEIGHT, WIDTH], "counts": "1X"}, "bad RLE", "end inside a count"),
        ({"size": [HEIGHT, WIDTH], "counts": "12~"}, "bad RLE", "outside the encoding"),
        ({"counts": [108]}, "bad RLE", "'size' and 'counts'"),
        ([[1, 1, 5, 1, 5]], "bad polygon", "odd number of coordinates"),
        ([[1, 1, 5, 1]], "bad polygon", "2 points; a polygon needs 3"),
        ([], "bad polygon", "empty list"),
        ("no/such/mask.png", "missing mask file", "no/such/mask.png"),
        (3.5, "unknown mask form", "float"),
    ],
)
def test_bad_masks_are_refused_with_their_reason(mask, reason, message):
    with pytest.raises(MaskError, match=message) as caught:
        validate_mask(mask, (HEIGHT, WIDTH), where="train.jsonl, line 4")
    assert caught.value.reason == reason
    assert str(caught.value).startswith(f"train.jsonl, line 4: {reason}")


def test_colour_png_is_refused_and_grey_rgb_accepted(tmp_path):
    grey = np.repeat(rectangle_mask()[..., None].astype(np.uint8) * 255, 3, axis=-1)
    np.testing.assert_array_equal(decode_mask(PIL.Image.fromarray(grey)), rectangle_mask())
    grey[0, 0] = (255, 0, 0)
    with pytest.raises(MaskError, match="colour image"):
        decode_mask(PIL.Image.fromarray(grey))
