"""`visualize_masks`: masks drawn where they are, in their colours, at the image's size; bad masks named."""

import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data

from transformers_setok import visualize_masks


@pytest.fixture(scope="module")
def horse():
    """A real silhouette (skimage's horse: True on the background) and a grey image of its size."""
    silhouette = ~data.horse()
    return PIL.Image.new("RGB", silhouette.shape[::-1], (128, 128, 128)), silhouette


def test_a_mask_colours_its_pixels_only(horse):
    image, mask = horse
    drawn = np.asarray(visualize_masks(image, mask, alpha=1.0, colors=[(255, 0, 0)], outline=False))
    assert drawn.shape == (*mask.shape, 3)
    assert (drawn[mask] == (255, 0, 0)).all()
    assert (drawn[~mask] == 128).all()


def test_alpha_blends_and_the_outline_is_the_masks_boundary(horse):
    image, mask = horse
    drawn = np.asarray(visualize_masks(image, mask, alpha=0.5, colors=[(0, 0, 255)])).astype(int)
    inside = mask.copy()
    inside[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    interior = inside & mask
    interior[[0, -1], :] = interior[:, [0, -1]] = False
    assert (drawn[interior] == (64, 64, 192)).all()  # half grey, half blue
    boundary = mask & ~interior
    boundary[[0, -1], :] = boundary[:, [0, -1]] = False
    assert (drawn[boundary] == (0, 0, 255)).all()


def test_several_masks_tensors_and_other_sizes(horse):
    image, mask = horse
    halves = np.zeros((2, *mask.shape), dtype=bool)
    halves[0, :, : mask.shape[1] // 2] = True
    halves[1, :, mask.shape[1] // 2 :] = True
    drawn = np.asarray(visualize_masks(image, torch.from_numpy(halves), alpha=1.0, outline=False))
    left, right = drawn[:, 0], drawn[:, -1]
    assert (left == left[0]).all() and (right == right[0]).all() and (left[0] != right[0]).any()
    # A mask of another size is resized to the image (nearest), so a half stays a half.
    small = PIL.Image.fromarray((halves[0, ::2, ::2] * 255).astype(np.uint8))
    assert (np.asarray(visualize_masks(image, [small], alpha=1.0, outline=False))[:, 0] == left[0]).all()


@pytest.mark.parametrize(
    "masks, message",
    [
        (np.full((4, 4), 0.5), "must be binary"),
        (np.zeros((2, 2, 2, 2)), "must be one"),
        ([], "must be one"),
        ([np.zeros(0)], "non-empty"),
    ],
)
def test_bad_masks_are_named(horse, masks, message):
    with pytest.raises(ValueError, match=message):
        visualize_masks(horse[0], masks)


def test_colours_must_match_the_masks(horse):
    with pytest.raises(ValueError, match="2 colours for 1 masks"):
        visualize_masks(horse[0], horse[1], colors=[(0, 0, 0), (1, 1, 1)])
