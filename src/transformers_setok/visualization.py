"""Drawing SeTok's cluster map, or segmentation masks, over an image."""

import colorsys

import numpy as np
import PIL.Image

from .processing.image_processing_setok import to_rgb_uint8

__all__ = ["cluster_palette", "visualize_clusters", "visualize_masks"]


def cluster_palette(num_colors: int) -> np.ndarray:
    """`(num_colors, 3)` uint8 colours, spread over the hue circle by the golden ratio so neighbours differ."""
    hues = (np.arange(num_colors) * 0.618033988749895) % 1.0
    values = 0.95 - 0.25 * (np.arange(num_colors) % 2)
    colours = [colorsys.hsv_to_rgb(h, 0.85, v) for h, v in zip(hues, values)]
    return (np.array(colours).reshape(-1, 3) * 255).round().astype(np.uint8)


def visualize_clusters(
    image,
    cluster_assignment,
    *,
    alpha: float = 0.5,
    boundary_color: tuple[int, int, int] = (255, 255, 255),
    size: int | None = None,
) -> PIL.Image.Image:
    """Overlay a cluster map on an image: each token's region in its own colour, with region boundaries drawn.

    Args:
        image: PIL image, numpy array or torch tensor (anything [`SetokImageProcessor`] accepts).
        cluster_assignment: `(h, w)` token index per encoder patch (`SetokModelOutput.cluster_assignment[i]`).
        alpha: opacity of the colours (0: image only, 1: colours only).
        boundary_color: RGB colour of the one-pixel boundaries between regions.
        size: side of the square output; defaults to the image's longer side capped at 512.

    Returns:
        An RGB `PIL.Image.Image`.
    """
    labels = np.asarray(cluster_assignment.cpu() if hasattr(cluster_assignment, "cpu") else cluster_assignment)
    if labels.ndim != 2 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`cluster_assignment` must be an integer (h, w) map, got {labels.dtype} {labels.shape}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
    rgb = PIL.Image.fromarray(to_rgb_uint8(image))
    size = size or min(max(rgb.size), 512)
    base = np.asarray(rgb.resize((size, size), PIL.Image.Resampling.BICUBIC)).astype(np.float32)

    rows = np.minimum(np.arange(size) * labels.shape[0] // size, labels.shape[0] - 1)
    cols = np.minimum(np.arange(size) * labels.shape[1] // size, labels.shape[1] - 1)
    label_map = labels[rows[:, None], cols[None, :]]
    colours = cluster_palette(int(label_map.max()) + 1)[np.clip(label_map, 0, None)].astype(np.float32)
    blended = (1 - alpha) * base + alpha * colours

    edge = np.zeros_like(label_map, dtype=bool)
    edge[1:, :] |= label_map[1:, :] != label_map[:-1, :]
    edge[:, 1:] |= label_map[:, 1:] != label_map[:, :-1]
    blended[edge] = boundary_color
    return PIL.Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def visualize_masks(
    image,
    masks,
    *,
    alpha: float = 0.5,
    colors: list[tuple[int, int, int]] | None = None,
    outline: bool = True,
) -> PIL.Image.Image:
    """Overlay binary masks on an image, each in its own colour (later masks on top), at the image's own size.

    Args:
        image: PIL image, numpy array or torch tensor (anything [`SetokImageProcessor`] accepts).
        masks: one `(H, W)` mask or several (a list, or an `(S, H, W)` array/tensor); bool, 0/1 or 0/255 values, or
            PIL images. Masks of another size than the image are resized to it (nearest neighbour).
        alpha: opacity of the colours (0: image only, 1: colours only).
        colors: one RGB colour per mask (default: `cluster_palette`).
        outline: draw each mask's one-pixel boundary in its full colour.

    Returns:
        An RGB `PIL.Image.Image` of the image's size.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
    rgb = PIL.Image.fromarray(to_rgb_uint8(image))
    masks = _mask_list(masks)
    if colors is None:
        colors = [tuple(int(c) for c in colour) for colour in cluster_palette(len(masks))]
    if len(colors) != len(masks):
        raise ValueError(f"`colors` has {len(colors)} colours for {len(masks)} masks.")
    blended = np.asarray(rgb).astype(np.float32)
    for index, (mask, colour) in enumerate(zip(masks, colors)):
        mask = _binary_mask(mask, index, rgb.size)
        colour = np.asarray(colour, dtype=np.float32)
        blended[mask] = (1 - alpha) * blended[mask] + alpha * colour
        if outline:
            inner = mask.copy()
            inner[1:, :] &= mask[:-1, :]
            inner[:-1, :] &= mask[1:, :]
            inner[:, 1:] &= mask[:, :-1]
            inner[:, :-1] &= mask[:, 1:]
            blended[mask & ~inner] = colour
    return PIL.Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def _mask_list(masks) -> list:
    if hasattr(masks, "cpu"):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, (PIL.Image.Image, np.ndarray)) and np.asarray(masks).ndim == 2:
        return [masks]
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        return list(masks)
    if isinstance(masks, (list, tuple)) and masks:
        return list(masks)
    raise ValueError(
        "`masks` must be one (H, W) mask, an (S, H, W) array or tensor, or a non-empty list of masks; got "
        f"{type(masks).__name__} {getattr(masks, 'shape', '')}."
    )


def _binary_mask(mask, index: int, size: tuple[int, int]) -> np.ndarray:
    """`mask` as an `(H, W)` bool array of the image's `size` (width, height)."""
    if isinstance(mask, PIL.Image.Image):
        mask = np.asarray(mask.convert("L"))
    mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"Mask {index} must be a non-empty (H, W) array, got shape {mask.shape}.")
    values = np.unique(mask)
    if not (np.isin(values, [0, 1]).all() or np.isin(values, [0, 255]).all()):
        raise ValueError(f"Mask {index} must be binary (bool, 0/1 or 0/255), found values {values[:6].tolist()}.")
    mask = mask.astype(bool)
    if mask.shape != (size[1], size[0]):
        resized = PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize(size, PIL.Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 127
    return mask
