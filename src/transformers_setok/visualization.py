"""Drawing SeTok's cluster map over an image."""

import colorsys

import numpy as np
import PIL.Image

from .processing.image_processing_setok import to_rgb_uint8

__all__ = ["cluster_palette", "visualize_clusters"]


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
