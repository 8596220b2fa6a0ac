"""SeTok's token cluster: density-peak clustering of patch features, batched over images.

Read top to bottom, the threshold variant (spec 1.2) is: position embedding, distances, density, delta, score,
centers, assignment. The iterative variant (spec 1.3) reuses density and delta to rank seeds and then claims patches
with soft masks. Everything is batched over images, in float32, in O(B * N^2) memory; `chunk_size` bounds that memory
for large batches. No random tie-breaks: results are deterministic and an image's clusters do not depend on the other
images of its batch.

Cost. The `(B, N, N)` matrix is built once, as squared distances `S = ||x_i - x_j||^2` (batched matmuls, on the CPU
only of the upper triangle of row blocks; the norms added in place), and every later step reads it without another
`(B, N, N)` copy. Distances `D = sqrt(S) / sqrt(C)`
are a non-decreasing function of `S`, so the k nearest, the nearest denser patch, the largest distance and the nearest
center are all found on `S`, and the square root is taken only of the entries selected; the results are bit for bit
those of computing on `D`. On the CPU the passes over `S` go a few images at a time (blocks that fit in cache) and
the k nearest come from `numpy.partition` (values only, several times faster there than `torch.topk`); on other
devices the whole chunk is one block and `torch.topk` picks them. Batches without padding skip all masking.
"""

import contextlib
import math
import numbers
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["dpc_knn_cluster", "iterative_cluster", "sincos_position_embedding_2d"]

# On the CPU, the passes over the (B, N, N) matrix go image block by image block, each block's working set (its
# slice of the matrix, a temporary of that size, its centred features and their squares) about this many bytes, so
# that it stays in a last-level cache (2 images at N = 729, C = 1152). Twice the size already costs a third more.
_CPU_BLOCK_BYTES = 24 * 2**20
_FLOAT32_MAX = torch.finfo(torch.float32).max


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


def _image_blocks(features: torch.Tensor):
    """Slices of the batch dimension: cache-sized blocks on the CPU, the whole batch elsewhere."""
    batch, num_patches, channels = features.shape
    if features.device.type != "cpu":
        yield slice(0, batch)
        return
    per_image = 4 * 2 * num_patches * (num_patches + channels)  # float32: matrix + temporary, features + squares
    per_block = max(1, _CPU_BLOCK_BYTES // per_image)
    for start in range(0, batch, per_block):
        yield slice(start, start + per_block)


def _distance(squared: torch.Tensor, channels: int) -> torch.Tensor:
    """`D = sqrt(S) / sqrt(C)` of selected squared distances (float rounding can make an `S` slightly negative)."""
    return squared.clamp_min(0).sqrt() / math.sqrt(channels)


def _centred(features: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Features minus their image's mean over real patches; padding rows are zero."""
    # Distances go through a Gram matrix (fast, batch-invariant); centring each image first keeps it accurate when
    # the features share a large offset (encoders have outlier channels), also under TF32 matmuls.
    if valid is None:
        return features - features.sum(1, keepdim=True) / features.shape[1]
    features = torch.where(valid[..., None], features, 0)  # padding may hold anything, NaN included
    mean = features.sum(1, keepdim=True) / valid.sum(1)[:, None, None]
    return torch.where(valid[..., None], features - mean, 0)


def _check_finite(features, valid, norms):
    """Raise if a real patch is not finite, or so large that float32 squared distances would overflow."""
    if torch.isfinite(norms).all() and norms.max() <= _FLOAT32_MAX / 4:
        return
    real = torch.ones_like(norms, dtype=torch.bool) if valid is None else valid
    if (real & ~torch.isfinite(features).all(-1)).any():
        raise ValueError("`features` contain NaN or infinite values.")
    raise ValueError(
        "`features` are too large: their squared distances overflow float32 (largest squared norm after centring "
        f"{norms.max().item():.3g}); scale them down."
    )


def squared_distances(features: torch.Tensor, valid: torch.Tensor | None = None, k_smallest: int | None = None):
    """Squared distances `S[b, i, j] = ||x_i - x_j||^2` `(B, N, N)` float32, and each image's largest entry `(B,)`.

    Spec 1.2's distances are `sqrt(S) / sqrt(C)`. The diagonal is exactly zero. `valid` (`(B, N)`, `True` on real
    patches; `None`: no padding): padding columns are `+inf` (never among the nearest, never a center), padding rows
    are left as they are, and the largest entry is over real pairs only. With `k_smallest`, a third output: the
    `k_smallest` smallest entries of every row in ascending order, `(B, N, k_smallest)`.

    Built image block by image block (centring, norms, Gram matrix, the rest in place), so the centred features exist
    for one block at a time; each value is the one the whole-batch expressions give.
    """
    batch, num_patches, _ = features.shape
    like = dict(dtype=torch.float32, device=features.device)
    squared = torch.empty(batch, num_patches, num_patches, **like)
    image_max = torch.empty(batch, **like)
    nearest = None if k_smallest is None else torch.empty(batch, num_patches, k_smallest, **like)
    norms = torch.empty(batch, num_patches, **like)
    workers = _partition_workers(features, k_smallest)
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for block in _image_blocks(features):
            real = None if valid is None else valid[block]
            x = _centred(features[block].float(), real)
            n = norms[block] = x.pow(2).sum(-1)
            gram = _gram(x, squared[block])
            del x
            # (n_i + n_j) - 2 G, rounded exactly like the direct expression (doubling is exact).
            torch.add(n[:, :, None] + n[:, None, :], gram, alpha=-2, out=gram)
            gram.diagonal(dim1=1, dim2=2).zero_()
            if real is None:
                image_max[block] = gram.amax((1, 2))
            else:
                padding = ~real
                gram.masked_fill_(padding[:, None, :], 0)  # 0 never exceeds the largest entry: the diagonal is 0
                image_max[block] = gram.amax(-1).masked_fill_(padding, 0).amax(-1)
                gram.masked_fill_(padding[:, None, :], math.inf)
            if k_smallest is not None:
                nearest[block] = _k_smallest(gram, k_smallest, pool, workers)
    _check_finite(features, valid, norms)  # once, from the norms: NaN or inf in a real patch makes its image's NaN
    return (squared, image_max) if k_smallest is None else (squared, image_max, nearest)


def _gram(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`x @ x^T` into `out` `(b, N, N)`. On the CPU the matrix is symmetric and only its upper triangle of row blocks
    is multiplied (about 256 rows a block: 3 blocks at N = 729, two thirds of the work), the rest mirrored."""
    num_patches = x.shape[1]
    parts = max(1, round(num_patches / 256)) if x.device.type == "cpu" else 1
    if parts == 1:
        return torch.bmm(x, x.transpose(1, 2), out=out)
    bounds = [round(i * num_patches / parts) for i in range(parts + 1)]
    rows = [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]
    for i, row in enumerate(rows):
        for column in rows[i:]:
            product = torch.bmm(x[:, row], x[:, column].transpose(1, 2))
            out[:, row, column] = product
            if column != row:
                out[:, column, row] = product.transpose(1, 2)
    return out


def _partition_workers(features, k_smallest) -> int:
    """Threads for `numpy.partition` on the CPU (it releases the GIL, and torch's threads wait meanwhile); 1: none."""
    if k_smallest is None or features.device.type != "cpu" or features.shape[1] < 256:
        return 1
    return max(1, min(torch.get_num_threads(), 8))


def pairwise_distances(features: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """`D[b, i, j] = ||x_i - x_j|| / sqrt(C)`, `(B, N, N)`, with an exact zero diagonal (`+inf` in padding columns).

    The clustering itself never builds this matrix (see the module docstring); it is here for inspection and tests.
    """
    return _distance(squared_distances(features, valid)[0], features.shape[-1])


def _k_smallest(squared: torch.Tensor, k: int, pool: ThreadPoolExecutor | None = None, workers: int = 1):
    """The `k` smallest entries of every row, in ascending order, `(B, N, k)` (values only).

    With `pool` (CPU), the rows are split among its `workers` threads; every row's result is the same either way.
    """
    if squared.device.type != "cpu":
        return squared.topk(k, dim=-1, largest=False, sorted=True).values
    rows = squared.numpy()

    def smallest_of(start, stop):
        smallest = np.partition(rows[:, start:stop], k - 1, axis=-1)[..., :k]
        smallest.sort(axis=-1)
        return smallest

    if pool is None:
        return torch.from_numpy(smallest_of(0, rows.shape[1]))
    bounds = np.linspace(0, rows.shape[1], workers + 1).round().astype(int).tolist()
    return torch.from_numpy(np.concatenate(list(pool.map(smallest_of, bounds[:-1], bounds[1:])), axis=1))


def local_density(nearest: torch.Tensor, valid: torch.Tensor | None, k: int, channels: int) -> torch.Tensor:
    """`rho[i] = exp(-mean of D[i, j]^2 over the k nearest real patches j)`, i itself included. `(B, N)`.

    `nearest`: the `min(k, N)` smallest squared distances of every row, ascending (`squared_distances`).
    """
    batch, _, k_max = nearest.shape
    nearest = _distance(nearest, channels).pow(2)
    if valid is None:
        k_per_image = torch.full((batch, 1), k_max, device=nearest.device)
    else:
        k_per_image = valid.sum(-1, keepdim=True).clamp(max=k)
        within_k = torch.arange(k_max, device=nearest.device) < k_per_image[:, :, None]
        nearest = nearest.masked_fill(~within_k, 0)
    return torch.exp(-(nearest.sum(-1) / k_per_image))


def density_ranks(density: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Rank of every patch by descending density (equal density: the lower index first; padding last). `(B, N)`."""
    if valid is not None:
        density = density.masked_fill(~valid, -math.inf)
    order = density.sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def distance_to_denser(
    squared: torch.Tensor, image_max: torch.Tensor, density: torch.Tensor, valid: torch.Tensor | None, channels: int
) -> torch.Tensor:
    """`delta[i] = min D[i, j]` over real patches j denser than i (equal density: the lower index wins).

    The densest patch of an image gets the largest distance of that image (not of its column, as upstream did).
    """
    # j is denser than i exactly when it ranks before i; padding ranks after every real patch.
    ranks = density_ranks(density, valid)
    nearest = torch.empty_like(density)
    for block in _image_blocks(squared):  # working set: the block of S, a mask and a masked copy
        rank = ranks[block]
        not_denser = rank[:, None, :] >= rank[:, :, None]
        nearest[block] = squared[block].masked_fill(not_denser, math.inf).amin(-1)
    nearest = torch.where(torch.isinf(nearest), image_max[:, None].expand_as(nearest), nearest)
    return _distance(nearest, channels)


def density_peak_scores(features: torch.Tensor, valid: torch.Tensor | None, k: int):
    """Squared distances `(B, N, N)` (see `squared_distances`) and the density-peak score `rho * delta` `(B, N)`."""
    channels = features.shape[-1]
    squared, image_max, nearest = squared_distances(features, valid, k_smallest=min(k, features.shape[1]))
    density = local_density(nearest, valid, k, channels)
    return squared, density * distance_to_denser(squared, image_max, density, valid, channels)


def score_ranks(score: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Rank of every patch by descending score within its image (ties: lower index first; padding last)."""
    if valid is not None:
        score = score.masked_fill(~valid, -math.inf)
    order = score.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def select_centers(
    score: torch.Tensor,
    valid: torch.Tensor | None,
    threshold: float,
    fallback_num_clusters: int,
    max_num_clusters: int | None,
) -> torch.Tensor:
    """Centers: scores above the threshold, else the `fallback_num_clusters` best; never more than `max_num_clusters`.

    Whichever rule chose them, only the best-scoring `max_num_clusters` are kept (a fallback larger than the cap is
    clipped to it). Returns a `(B, N)` mask; centers are numbered in patch order by `assign_to_centers`.
    """
    cap = score.shape[-1] if max_num_clusters is None else max_num_clusters
    ranks = score_ranks(score, valid)
    passing = score > threshold
    if valid is not None:
        passing &= valid
    any_passing = passing.any(-1, keepdim=True)
    passing &= ranks < cap
    fallback = ranks < min(fallback_num_clusters, cap)
    if valid is not None:
        fallback &= valid
    return torch.where(any_passing, passing, fallback)


def assign_to_centers(
    squared: torch.Tensor, is_center: torch.Tensor, valid: torch.Tensor | None, channels: int
) -> torch.Tensor:
    """Label of the nearest center for every patch (ties: the earlier center); padding gets -1. `(B, N)`.

    Label `j` is the `j`-th center in patch order; each center is in its own cluster.
    """
    batch, num_patches = is_center.shape
    counts = is_center.sum(-1)
    width = int(counts.max())
    # The centers' patch indices in ascending order, then their columns of S: (B, N, L_max), not (B, N, N).
    centers = is_center.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[:, :width]
    to_centers = _distance(squared.gather(2, centers[:, None, :].expand(batch, num_patches, width)), channels)
    if not bool((counts == width).all()):
        beyond = torch.arange(width, device=counts.device) >= counts[:, None]
        to_centers.masked_fill_(beyond[:, None, :], math.inf)
    labels = torch.where(is_center, is_center.long().cumsum(-1) - 1, to_centers.argmin(-1))
    return labels if valid is None else labels.masked_fill(~valid, -1)


def _scalar(value):
    """The Python number inside a 0-d tensor or 0-d numpy array; anything else unchanged."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        return value.item()
    return value


def _as_int(name: str, value, optional: bool = False) -> int | None:
    """`value` as a positive Python int (Python, numpy and 0-d tensor integers; not bools), or `None` if allowed."""
    if value is None and optional:
        return None
    number = _scalar(value)
    if isinstance(number, numbers.Integral) and not isinstance(number, (bool, np.bool_)) and number >= 1:
        return int(number)
    raise ValueError(f"`{name}` must be a positive integer{' or None' if optional else ''}, got {value!r}.")


def _as_float(name: str, value, condition: str = "a finite number", check=lambda v: True) -> float:
    """`value` as a finite Python float (Python, numpy and 0-d tensor reals; not bools) meeting `check`."""
    number = _scalar(value)
    if isinstance(number, numbers.Real) and not isinstance(number, (bool, np.bool_)):
        number = float(number)
        if math.isfinite(number) and check(number):
            return number
    raise ValueError(f"`{name}` must be {condition}, got {value!r}.")


def _validate_cluster_inputs(features, padding_mask):
    """Check features and padding. Returns the `(B, N)` real-patch mask, or `None` when nothing is padding."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"`features` must be a torch.Tensor of shape (B, N, C), got {type(features).__name__}.")
    if features.ndim != 3 or 0 in features.shape:
        raise ValueError(f"`features` must have shape (B, N, C) with B, N, C >= 1, got {tuple(features.shape)}.")
    if not features.is_floating_point():
        raise TypeError(f"`features` must be a floating-point tensor, got {features.dtype}.")
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.shape != features.shape[:2]:
        shape = tuple(padding_mask.shape) if isinstance(padding_mask, torch.Tensor) else type(padding_mask)
        raise ValueError(f"`padding_mask` must be a (B, N) = {tuple(features.shape[:2])} tensor, got {shape}.")
    valid = ~padding_mask.to(device=features.device, dtype=torch.bool)
    if not valid.any(-1).all():
        raise ValueError("`padding_mask` marks every patch of an image as padding; each image needs one real patch.")
    return valid
    # NaN and infinite values in real patches are rejected in `squared_distances`, from the norms it computes anyway.


def _in_chunks(fn, chunk_size, features, valid):
    """Run `fn(features, valid)` on slices of at most `chunk_size` images and concatenate its tuple of outputs.

    A chunk without padding gets `valid=None` (the unmasked path).
    """

    def call(x, real):
        return fn(x, None if real is None or bool(real.all()) else real)

    if chunk_size is None or chunk_size >= features.shape[0]:
        return call(features, valid)
    parts = [
        call(features[i : i + chunk_size], None if valid is None else valid[i : i + chunk_size])
        for i in range(0, features.shape[0], chunk_size)
    ]
    return tuple(_cat_padded(outputs) for outputs in zip(*parts))


def _cat_padded(tensors):
    """Concatenate along the batch, zero-padding dim 1 of 3D outputs (per-chunk cluster counts differ)."""
    if tensors[0] is None:
        return None
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

    Numbers may be Python, numpy or 0-d tensor numbers.

    Args:
        features (`torch.Tensor` of shape `(B, N, C)`): patch features (position embedding already added).
            Computed in float32 whatever their dtype.
        k (`int`): neighbours of the local density, the patch itself included (capped at the real patch count).
        threshold (`float`): a patch whose `rho * delta` exceeds it becomes a center.
        fallback_num_clusters (`int`): centers taken (best scores) when no score passes, capped at the real patch
            count and at `max_num_clusters`.
        max_num_clusters (`int`, *optional*): a hard cap on the clusters of an image, whichever rule chose the
            centers: of the passing centers, or of the fallback ones, only the `max_num_clusters` best scores are
            kept (a `fallback_num_clusters` above the cap is clipped to it). `None`: no cap.
        padding_mask (`torch.Tensor` of shape `(B, N)`, *optional*): `True` where a position is padding; padding
            never influences the real patches and is labelled -1.
        chunk_size (`int`, *optional*): images processed at once; the `(chunk_size, N, N)` float32 matrix and the
            `(chunk_size, N, C)` centred features are the working set.

    Returns:
        `assignment` (int64, `(B, N)`, values in `[0, L_b)`; label `j` is the `j`-th center in raster order) and
        `num_clusters` (int64, `(B,)`, the `L_b`, at most `max_num_clusters`).
    """
    valid = _validate_cluster_inputs(features, padding_mask)
    k = _as_int("k", k)
    threshold = _as_float("threshold", threshold)
    fallback_num_clusters = _as_int("fallback_num_clusters", fallback_num_clusters)
    max_num_clusters = _as_int("max_num_clusters", max_num_clusters, optional=True)
    chunk_size = _as_int("chunk_size", chunk_size, optional=True)
    channels = features.shape[-1]

    def cluster(x, real):
        squared, score = density_peak_scores(x, real, k)
        is_center = select_centers(score, real, threshold, fallback_num_clusters, max_num_clusters)
        return assign_to_centers(squared, is_center, real, channels), is_center.sum(-1)

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
    patches or after `max_num_clusters` seeds; unclaimed scope left by the stop rule forms one last cluster (only when
    fewer than `max_num_clusters` seeds were taken, so an image never has more than `max_num_clusters` clusters).
    Every patch joins the cluster whose mask is largest there. Clusters are numbered by their seed's raster position,
    the leftover cluster last; clusters that win no patch are dropped. Numbers may be Python, numpy or 0-d tensor
    numbers.

    Returns:
        `assignment` (`(B, N)`, -1 on padding) and `num_clusters` (`(B,)`); with `return_soft_assignment`, also the
        masks `(B, L_max, N)` in label order.
    """
    # Unlike in `dpc_knn_cluster`, `max_num_clusters` is required here: it is the only bound on the seed loop.
    valid = _validate_cluster_inputs(features, padding_mask)
    k = _as_int("k", k)
    max_num_clusters = _as_int("max_num_clusters", max_num_clusters)
    chunk_size = _as_int("chunk_size", chunk_size, optional=True)
    bandwidth_scale = _as_float("bandwidth_scale", bandwidth_scale, "a finite number > 0", lambda v: v > 0)
    stop_mass = _as_float("stop_mass", stop_mass, "a number in (0, 1)", lambda v: 0 < v < 1)
    channels = features.shape[-1]

    def cluster(x, real):
        squared, score = density_peak_scores(x, real, k)
        masks, seeds = _claim_by_seeds(squared, score, real, channels, max_num_clusters, bandwidth_scale, stop_mass)
        return _hard_assignment(masks, seeds, real, return_soft_assignment)

    assignment, num_clusters, soft = _in_chunks(cluster, chunk_size, features, valid)
    return (assignment, num_clusters, soft) if return_soft_assignment else (assignment, num_clusters)


def _claim_by_seeds(squared, score, valid, channels, max_num_clusters, bandwidth_scale, stop_mass):
    """Seed selection with shrinking scope. Returns masks `(B, S + 1, N)` and seed indices `(B, S + 1)` (-1: none)."""
    batch, num_patches = score.shape
    # The mean of D^2 over real pairs, summed exactly as over the matrix of distances (padding entries are +inf).
    distance_squared = torch.empty_like(squared)
    for block in _image_blocks(squared):
        torch.pow(_distance(squared[block], channels), 2, out=distance_squared[block])
    padded = valid is not None
    if padded:
        distance_squared.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0)
    else:
        valid = torch.ones_like(score, dtype=torch.bool)
    num_valid = valid.sum(-1).float()
    mean_squared = distance_squared.flatten(1).sum(-1) / (num_valid**2).clamp_min(1)
    del distance_squared
    bandwidth = (bandwidth_scale * mean_squared).clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    cap = torch.minimum(num_valid.long(), torch.full_like(num_valid, max_num_clusters).long())

    scope = valid.float()
    masks, seeds = [], []
    for step in range(min(max_num_clusters, num_patches)):
        active = (scope.sum(-1) >= stop_mass * num_valid) & (step < cap)
        if not active.any():
            break
        weighted = score * scope
        seed = (weighted.masked_fill(~valid, -math.inf) if padded else weighted).argmax(-1)
        seed_squared = squared.gather(1, seed[:, None, None].expand(batch, 1, num_patches))[:, 0]
        alpha = torch.exp(-_distance(seed_squared, channels).pow(2) / bandwidth)
        claimed = scope * alpha
        claimed = (claimed * valid if padded else claimed) * active[:, None]
        scope = scope - claimed
        masks.append(claimed)
        seeds.append(torch.where(active, seed, -1))
    stopped_early = torch.stack(seeds, -1).ge(0).sum(-1) < cap if seeds else torch.ones_like(valid[:, 0])
    masks.append(scope * stopped_early[:, None])
    seeds.append(torch.full_like(valid[:, 0], num_patches, dtype=torch.long))  # the leftover sorts last
    return torch.stack(masks, 1), torch.stack(seeds, 1)


def _hard_assignment(masks, seeds, valid, return_soft_assignment=True):
    """Argmax over cluster masks, then compact labels ordered by seed position (empty clusters dropped)."""
    if valid is None:
        valid = torch.ones_like(masks[:, 0], dtype=torch.bool)
    winner = masks.argmax(1)
    counts = torch.zeros_like(masks[:, :, 0]).scatter_add_(1, winner, valid.float())
    present = counts > 0
    key = seeds.float().masked_fill(~present, float("inf"))
    order = key.sort(dim=-1, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    new_label = torch.empty_like(order).scatter_(-1, order, positions)
    assignment = new_label.gather(1, winner).masked_fill(~valid, -1)
    num_clusters = present.sum(-1)
    if not return_soft_assignment:
        return assignment, num_clusters, None
    soft = masks.gather(1, order[:, :, None].expand_as(masks))[:, : int(num_clusters.max())]
    # Dropped clusters sort last but may still hold some mass: zero every row past an image's own count, so those
    # rows are padding whatever the other images of the batch (or chunk) are.
    soft = soft * (positions[:, : soft.shape[1]] < num_clusters[:, None])[:, :, None]
    return assignment, num_clusters, soft
