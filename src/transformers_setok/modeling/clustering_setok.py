"""SeTok's token cluster: density-peak clustering of patch features, batched over images.

Read top to bottom, the threshold variant (spec 1.2) is: position embedding, distances, density, delta, score,
centers, assignment. The iterative variant (spec 1.3) reuses density and delta to rank seeds and then claims patches
with soft masks. Everything runs on a whole batch at once with a padding mask, in float32, in O(B * N^2) memory;
`chunk_size` bounds that memory for large batches. No random tie-breaks: results are deterministic and an image's
clusters do not depend on the other images of its batch.
"""

import math
import numbers

import torch

__all__ = ["dpc_knn_cluster", "iterative_cluster", "sincos_position_embedding_2d"]


def sincos_position_embedding_2d(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, `(height * width, dim)` in raster order.

    Half of the channels encode the row, half the column (the upstream code sliced a 4096-wide table to the encoder
    width and so kept only one axis). Channels beyond a multiple of 4 stay zero.
    """
    quarter = dim // 4
    # Built in float64 on the CPU (not every accelerator has float64), then moved.
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1)))
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)
    cols = torch.arange(width, dtype=torch.float64).repeat(height)
    row_angles, col_angles = rows[:, None] * omega, cols[:, None] * omega
    embedding = torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=-1)
    embedding = torch.nn.functional.pad(embedding, (0, dim - 4 * quarter))
    return embedding.to(device=device, dtype=torch.float32)


def pairwise_distances(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`D[b, i, j] = ||x_i - x_j|| / sqrt(C)`, `(B, N, N)`, with an exact zero diagonal."""
    # Distances go through a Gram matrix (fast, batch-invariant); centring each image first keeps it accurate when
    # the features share a large offset (encoders have outlier channels), also under TF32 matmuls.
    features = torch.where(valid[..., None], features, 0)  # padding may hold anything, NaN included
    mean = features.sum(1, keepdim=True) / valid.sum(1)[:, None, None]
    features = torch.where(valid[..., None], features - mean, 0)
    squared_norms = features.pow(2).sum(-1)
    squared = squared_norms[:, :, None] + squared_norms[:, None, :] - 2 * features @ features.transpose(1, 2)
    distances = squared.clamp_min_(0).sqrt_() / math.sqrt(features.shape[-1])
    distances.diagonal(dim1=1, dim2=2).zero_()
    return distances


def local_density(distances: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """`rho[i] = exp(-mean of D[i, j]^2 over the k nearest real patches j)`, i itself included. `(B, N)`."""
    num_valid = valid.sum(-1, keepdim=True)
    k_max = min(k, distances.shape[-1])
    masked = distances.masked_fill(~valid[:, None, :], float("inf"))
    nearest = masked.topk(k_max, dim=-1, largest=False).values
    k_per_image = num_valid.clamp(max=k)
    within_k = torch.arange(k_max, device=distances.device) < k_per_image[:, :, None]
    mean_squared = nearest.pow(2).masked_fill(~within_k, 0).sum(-1) / k_per_image
    return torch.exp(-mean_squared)


def distance_to_denser(distances: torch.Tensor, density: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`delta[i] = min D[i, j]` over real patches j denser than i (equal density: the lower index wins).

    The densest patch of an image gets the largest distance of that image (not of its column, as upstream did).
    """
    index = torch.arange(density.shape[-1], device=density.device)
    rho_i, rho_j = density[:, :, None], density[:, None, :]
    denser = (rho_j > rho_i) | ((rho_j == rho_i) & (index[None, None, :] < index[None, :, None]))
    denser &= valid[:, None, :]
    delta = distances.masked_fill(~denser, float("inf")).amin(-1)
    pair_valid = valid[:, :, None] & valid[:, None, :]
    image_max = distances.masked_fill(~pair_valid, 0).flatten(1).amax(-1, keepdim=True)
    return torch.where(torch.isinf(delta), image_max.expand_as(delta), delta)


def density_peak_scores(features: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances `(B, N, N)` and the density-peak score `rho * delta` `(B, N)`, in float32."""
    distances = pairwise_distances(features.float(), valid)
    density = local_density(distances, valid, k)
    return distances, density * distance_to_denser(distances, density, valid)


def score_ranks(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of every patch by descending score within its image (ties: lower index first; padding last)."""
    order = score.masked_fill(~valid, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def select_centers(
    score: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    fallback_num_clusters: int,
    max_num_clusters: int | None,
) -> torch.Tensor:
    """Centers: scores above the threshold, else the `fallback_num_clusters` best; at most `max_num_clusters`."""
    ranks = score_ranks(score, valid)
    passing = (score > threshold) & valid
    any_passing = passing.any(-1, keepdim=True)
    if max_num_clusters is not None:
        passing &= ranks < max_num_clusters
    fallback = (ranks < fallback_num_clusters) & valid
    return torch.where(any_passing, passing, fallback)


def assign_to_centers(distances: torch.Tensor, is_center: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Label of the nearest center for every patch (ties: the earlier center); padding gets -1. `(B, N)`."""
    center_label = is_center.long().cumsum(-1) - 1
    nearest = distances.masked_fill(~is_center[:, None, :], float("inf")).argmin(-1)
    labels = center_label.gather(-1, nearest)
    labels = torch.where(is_center, center_label, labels)
    return labels.masked_fill(~valid, -1)


def _validate_cluster_inputs(features, padding_mask, optional=("max_num_clusters", "chunk_size"), **positive_ints):
    """Check the shared arguments; `None` is allowed for the `optional` counts. Returns the `(B, N)` real-patch mask."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"`features` must be a torch.Tensor of shape (B, N, C), got {type(features).__name__}.")
    if features.ndim != 3 or 0 in features.shape:
        raise ValueError(f"`features` must have shape (B, N, C) with B, N, C >= 1, got {tuple(features.shape)}.")
    if not features.is_floating_point():
        raise TypeError(f"`features` must be a floating-point tensor, got {features.dtype}.")
    for name, value in positive_ints.items():
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    valid = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    if padding_mask is not None:
        if not isinstance(padding_mask, torch.Tensor) or padding_mask.shape != features.shape[:2]:
            shape = tuple(padding_mask.shape) if isinstance(padding_mask, torch.Tensor) else type(padding_mask)
            raise ValueError(f"`padding_mask` must be a (B, N) = {tuple(features.shape[:2])} tensor, got {shape}.")
        valid = ~padding_mask.to(device=features.device, dtype=torch.bool)
        if not valid.any(-1).all():
            raise ValueError(
                "`padding_mask` marks every patch of an image as padding; each image needs one real patch."
            )
    if (valid & ~torch.isfinite(features).all(-1)).any():  # padding may hold anything
        raise ValueError("`features` contain NaN or infinite values.")
    return valid


def _in_chunks(fn, chunk_size, *tensors):
    """Run `fn` on slices of at most `chunk_size` images and concatenate its tuple of outputs."""
    if chunk_size is None or chunk_size >= tensors[0].shape[0]:
        return fn(*tensors)
    parts = [fn(*(t[i : i + chunk_size] for t in tensors)) for i in range(0, tensors[0].shape[0], chunk_size)]
    return tuple(_cat_padded(outputs) for outputs in zip(*parts))


def _cat_padded(tensors):
    """Concatenate along the batch, zero-padding dim 1 of 3D outputs (per-chunk cluster counts differ)."""
    if tensors[0].ndim == 3:
        width = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in tensors]
    return torch.cat(tensors)


@torch.no_grad()
def dpc_knn_cluster(
    features: torch.Tensor,
    *,
    k: int,
    threshold: float,
    fallback_num_clusters: int,
    max_num_clusters: int | None = None,
    padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering (DPC-KNN), threshold variant, on a batch of patch features.

    Args:
        features (`torch.Tensor` of shape `(B, N, C)`): patch features (position embedding already added).
            Computed in float32 whatever their dtype.
        k (`int`): neighbours of the local density, the patch itself included (capped at the real patch count).
        threshold (`float`): a patch whose `rho * delta` exceeds it becomes a center.
        fallback_num_clusters (`int`): centers taken (best scores) when no score passes, capped at N.
        max_num_clusters (`int`, *optional*): keep at most this many of the passing centers (best scores).
        padding_mask (`torch.Tensor` of shape `(B, N)`, *optional*): `True` where a position is padding; padding
            never influences the real patches and is labelled -1.
        chunk_size (`int`, *optional*): images processed at once.

    Returns:
        `assignment` (int64, `(B, N)`, values in `[0, L_b)`; label `j` is the `j`-th center in raster order) and
        `num_clusters` (int64, `(B,)`, the `L_b`).
    """
    valid = _validate_cluster_inputs(
        features,
        padding_mask,
        k=k,
        fallback_num_clusters=fallback_num_clusters,
        max_num_clusters=max_num_clusters,
        chunk_size=chunk_size,
    )
    # `math.isfinite` alone would reject a string or None with a message that does not name the argument.
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"`threshold` must be a finite number, got {threshold!r}.")

    def cluster(x, real):
        distances, score = density_peak_scores(x, real, k)
        is_center = select_centers(score, real, threshold, fallback_num_clusters, max_num_clusters)
        return assign_to_centers(distances, is_center, real), is_center.sum(-1)

    return _in_chunks(cluster, chunk_size, features, valid)


@torch.no_grad()
def iterative_cluster(
    features: torch.Tensor,
    *,
    k: int,
    max_num_clusters: int,
    bandwidth_scale: float = 0.1,
    stop_mass: float = 0.05,
    padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_soft_assignment: bool = False,
):
    """The paper's iterative cluster selection, batched.

    Every patch starts with a scope of 1. Each step takes the patch with the highest `rho * delta * scope` as a seed,
    forms the soft mask `alpha = exp(-D(x, seed)^2 / bandwidth)`, gives `scope * alpha` to a new cluster and keeps
    `scope * (1 - alpha)`. The bandwidth is `bandwidth_scale` times the image's mean squared patch distance, which
    makes it independent of the feature scale. An image stops once its unclaimed scope is below `stop_mass` of its
    patches or after `max_num_clusters` seeds; unclaimed scope left by the stop rule forms one last cluster. Every
    patch joins the cluster whose mask is largest there. Clusters are numbered by their seed's raster position, the
    leftover cluster last; clusters that win no patch are dropped.

    Returns:
        `assignment` (`(B, N)`, -1 on padding) and `num_clusters` (`(B,)`); with `return_soft_assignment`, also the
        masks `(B, L_max, N)` in label order.
    """
    # Unlike in `dpc_knn_cluster`, `max_num_clusters` is required here: it is the only bound on the seed loop.
    valid = _validate_cluster_inputs(
        features, padding_mask, optional=("chunk_size",), k=k, max_num_clusters=max_num_clusters, chunk_size=chunk_size
    )
    if not (bandwidth_scale > 0 and 0 < stop_mass < 1):
        raise ValueError(f"need `bandwidth_scale` > 0 and 0 < `stop_mass` < 1, got {bandwidth_scale}, {stop_mass}.")

    def cluster(x, real):
        distances, score = density_peak_scores(x, real, k)
        masks, seeds = _claim_by_seeds(distances, score, real, max_num_clusters, bandwidth_scale, stop_mass)
        return _hard_assignment(masks, seeds, real)

    assignment, num_clusters, soft = _in_chunks(cluster, chunk_size, features, valid)
    return (assignment, num_clusters, soft) if return_soft_assignment else (assignment, num_clusters)


def _claim_by_seeds(distances, score, valid, max_num_clusters, bandwidth_scale, stop_mass):
    """Seed selection with shrinking scope. Returns masks `(B, S + 1, N)` and seed indices `(B, S + 1)` (-1: none)."""
    batch, num_patches = score.shape
    num_valid = valid.sum(-1).float()
    pair_valid = valid[:, :, None] & valid[:, None, :]
    mean_squared = distances.pow(2).masked_fill(~pair_valid, 0).flatten(1).sum(-1) / (num_valid**2).clamp_min(1)
    bandwidth = (bandwidth_scale * mean_squared).clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    cap = torch.minimum(num_valid.long(), torch.full_like(num_valid, max_num_clusters).long())

    scope = valid.float()
    masks, seeds = [], []
    for step in range(min(max_num_clusters, num_patches)):
        active = (scope.sum(-1) >= stop_mass * num_valid) & (step < cap)
        if not active.any():
            break
        seed = (score * scope).masked_fill(~valid, float("-inf")).argmax(-1)
        seed_distances = distances.gather(1, seed[:, None, None].expand(batch, 1, num_patches))[:, 0]
        alpha = torch.exp(-seed_distances.pow(2) / bandwidth)
        claimed = scope * alpha * valid * active[:, None]
        scope = scope - claimed
        masks.append(claimed)
        seeds.append(torch.where(active, seed, -1))
    stopped_early = torch.stack(seeds, -1).ge(0).sum(-1) < cap if seeds else torch.ones_like(valid[:, 0])
    masks.append(scope * stopped_early[:, None])
    seeds.append(torch.full_like(valid[:, 0], num_patches, dtype=torch.long))  # the leftover sorts last
    return torch.stack(masks, 1), torch.stack(seeds, 1)


def _hard_assignment(masks, seeds, valid):
    """Argmax over cluster masks, then compact labels ordered by seed position (empty clusters dropped)."""
    winner = masks.argmax(1)
    counts = torch.zeros_like(masks[:, :, 0]).scatter_add_(1, winner, valid.float())
    present = counts > 0
    key = seeds.float().masked_fill(~present, float("inf"))
    order = key.sort(dim=-1, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    new_label = torch.empty_like(order).scatter_(-1, order, positions)
    assignment = new_label.gather(1, winner).masked_fill(~valid, -1)
    num_clusters = present.sum(-1)
    soft = masks.gather(1, order[:, :, None].expand_as(masks))[:, : int(num_clusters.max())]
    # Dropped clusters sort last but may still hold some mass: zero every row past an image's own count, so those
    # rows are padding whatever the other images of the batch (or chunk) are.
    soft = soft * (positions[:, : soft.shape[1]] < num_clusters[:, None])[:, :, None]
    return assignment, num_clusters, soft
