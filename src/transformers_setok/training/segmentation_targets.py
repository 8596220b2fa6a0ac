"""How many tokens the answer about a referred object has: the object's share of SeTok's semantic units.

A referring-segmentation answer is the object's image block, `[Img] <image> x m [/Img]`; the LLM writes it, m
included, and its hidden states at the m slots prompt the mask decoder. During training m is the number of SeTok
clusters of the image that lie mostly on the object: the concept-level tokens that carry where it is (spec 2). The
clusters come from the step's one SeTok run (`SetokimImageFeatures.cluster_assignment`); nothing is encoded again.
"""

import torch
import torch.nn.functional as F

__all__ = ["OBJECT_COVERAGE", "object_token_counts"]

# A cluster belongs to the object when at least this share of its area lies on the object's mask.
OBJECT_COVERAGE = 0.5


def object_token_counts(
    cluster_assignment: torch.Tensor,
    target_masks: torch.Tensor,
    image_index: torch.Tensor,
    coverage: float = OBJECT_COVERAGE,
) -> list[int]:
    """m_s for each of S objects: the clusters of its image with at least `coverage` of their area on its mask, at
    least one (the cluster most on the object, for an object smaller than every cluster).

    `cluster_assignment` `(num_images, g, g)`: the token of each encoder patch; `target_masks` `(S, H, W)` bool or
    0/1 at the processed image's resolution; `image_index` `(S,)`: each object's image.
    """
    if target_masks.ndim != 3 or len(target_masks) != len(image_index):
        raise ValueError(
            f"`target_masks` must be (S, H, W) with one mask per entry of `image_index` ({len(image_index)}), got "
            f"shape {tuple(target_masks.shape)}."
        )
    grid = cluster_assignment.shape[-2:]
    # The share of each patch that lies on the object: the mask's area average over the patch.
    on_object = F.adaptive_avg_pool2d(target_masks.float()[:, None], grid)[:, 0]
    counts = []
    for share, image in zip(on_object, image_index.tolist()):
        labels = cluster_assignment[image].to(share.device).flatten()
        area = torch.bincount(labels).float()
        covered = torch.bincount(labels, weights=share.flatten()).float()
        fraction = covered[area > 0] / area[area > 0]
        counts.append(max(1, int((fraction >= coverage).sum())))
    return counts
