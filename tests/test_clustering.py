"""Token cluster tests: DPC-KNN (spec 1.2), the iterative variant (spec 1.3) and the 2D position embedding.

The threshold variant is checked against `reference_dpc`, a slow, loop-based transcription of spec 1.2 in float64
numpy that shares no code with the implementation.
"""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from transformers_setok import SetokConfig, dpc_knn_cluster, iterative_cluster, sincos_position_embedding_2d
from transformers_setok.modeling import clustering_setok as clustering
from transformers_setok.modeling.clustering_setok import pairwise_distances

# ---------------------------------------------------------------------------------------------------------------
# Reference implementation of spec 1.2 (one image, plain loops, float64)
# ---------------------------------------------------------------------------------------------------------------


def reference_dpc(features, k, threshold, fallback_num_clusters, max_num_clusters=None, padding=None):
    """Spec 1.2 for one image `(N, C)`. Returns `(assignment with -1 on padding, num_clusters, margin)`.

    `margin` is the smallest gap at any decision the algorithm takes (score vs threshold, density order, score rank at
    the fallback / cap boundary, nearest vs second nearest center). A float32 implementation can only be expected to
    agree exactly when it is well above float32 rounding.
    """
    x = np.asarray(features, dtype=np.float64)
    n_all, channels = x.shape
    real = [i for i in range(n_all) if padding is None or not padding[i]]
    n = len(real)

    dist = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            dist[a][b] = math.sqrt(sum((x[real[a], c] - x[real[b], c]) ** 2 for c in range(channels))) / math.sqrt(
                channels
            )
    largest = max(max(row) for row in dist)

    kk = min(k, n)
    rho = [math.exp(-sum(sorted(d * d for d in dist[a])[:kk]) / kk) for a in range(n)]

    delta = []
    for a in range(n):
        denser = [b for b in range(n) if rho[b] > rho[a] or (rho[b] == rho[a] and b < a)]
        delta.append(min(dist[a][b] for b in denser) if denser else largest)
    score = [rho[a] * delta[a] for a in range(n)]

    margins = [abs(s - threshold) for s in score]
    margins += [abs(rho[a] - rho[b]) for a in range(n) for b in range(a) if rho[a] != rho[b]]

    # Centers: the passing scores, else the fallback count (capped at n); either way at most max_num_clusters, the
    # best scores kept (the cap is hard: a fallback count above it is clipped to it).
    ranked = sorted(range(n), key=lambda a: (-score[a], a))
    cap = n if max_num_clusters is None else max_num_clusters
    centers = [a for a in range(n) if score[a] > threshold]
    if not centers:
        count = min(fallback_num_clusters, n, cap)
        centers = ranked[:count]
        if count < n:
            margins.append(score[ranked[count - 1]] - score[ranked[count]])
    elif len(centers) > cap:
        centers = ranked[:cap]
        margins.append(score[ranked[cap - 1]] - score[ranked[cap]])
    centers = sorted(centers)

    labels = []
    for a in range(n):
        if a in centers:
            labels.append(centers.index(a))
            continue
        best, best_label, second = math.inf, -1, math.inf
        for label, c in enumerate(centers):
            if dist[a][c] < best:
                best, best_label, second = dist[a][c], label, best
            elif dist[a][c] < second:
                second = dist[a][c]
        labels.append(best_label)
        if len(centers) > 1:
            margins.append(second - best)

    assignment = np.full(n_all, -1, dtype=np.int64)
    assignment[real] = labels
    return assignment, len(centers), min(margins) if margins else math.inf


def random_image(rng, num_patches, channels, num_blobs):
    """Patches drawn around a few random means (realistic: some structure, varied densities) plus noise."""
    means = rng.normal(size=(num_blobs, channels)) * 1.5
    return means[rng.integers(0, num_blobs, size=num_patches)] + 0.5 * rng.normal(size=(num_patches, channels))


def well_conditioned_batch(seed, batch, num_patches, channels, k, threshold, fallback, max_num, with_padding):
    """A batch whose reference margins are far above float32 rounding (deterministic: retries with new draws)."""
    rng = np.random.default_rng(seed)
    images, paddings, expected = [], [], []
    while len(images) < batch:
        image = random_image(rng, num_patches, channels, int(rng.integers(1, 6)))
        padding = np.zeros(num_patches, dtype=bool)
        if with_padding and len(images) > 0:
            padding[rng.permutation(num_patches)[: int(rng.integers(1, num_patches // 2))]] = True
            image[padding] = rng.normal(size=(int(padding.sum()), channels)) * 10  # junk that must not matter
        assignment, count, margin = reference_dpc(image, k, threshold, fallback, max_num, padding)
        if margin > 1e-4:
            images.append(image)
            paddings.append(padding)
            expected.append((assignment, count))
    features = torch.tensor(np.stack(images), dtype=torch.float32)
    return features, torch.tensor(np.stack(paddings)), expected


def blob_features(labels, channels=8, separation=10.0, noise=0.05, seed=0):
    """Well separated gaussian blobs: patch i is drawn around the mean of blob `labels[i]`."""
    generator = torch.Generator().manual_seed(seed)
    num_blobs = max(labels) + 1
    means = torch.randn(num_blobs, channels, generator=generator)
    means = separation * means / means.norm(dim=-1, keepdim=True) * math.sqrt(channels)
    labels = torch.tensor(labels)
    return means[labels] + noise * torch.randn(len(labels), channels, generator=generator)


def raster_blob_labels(height=8, width=8):
    """Four horizontal bands of the grid: every patch of blob j precedes every patch of blob j + 1 in raster order,
    so whichever patch is a blob's center, the j-th center in raster order belongs to blob j."""
    return [r * 4 // height for r in range(height) for c in range(width)]


DPC = dict(k=4, threshold=1.0, fallback_num_clusters=8)


# ---------------------------------------------------------------------------------------------------------------
# Threshold variant: known structure
# ---------------------------------------------------------------------------------------------------------------


def test_recovers_blobs_in_raster_order():
    labels = raster_blob_labels()
    assignment, num_clusters = dpc_knn_cluster(blob_features(labels)[None], **DPC)
    assert num_clusters.tolist() == [4]
    assert assignment.dtype == torch.int64 and num_clusters.dtype == torch.int64
    assert assignment[0].tolist() == labels


def interleaved_blobs():
    """Three blobs whose patches are interleaved in index order, each with an exact core (its mean, three copies).

    The first copy of each core is its blob's center (densest, far from any other blob; the later copies have
    delta = 0). Core positions are chosen so that the raster order of the centers (blob 2 at index 1, blob 0 at 5,
    blob 1 at 9) differs from the blob numbering and from the order in which the blobs first appear.
    Returns features `(1, N, 4)`, the blob of every patch and the expected label of every blob.
    """
    generator = torch.Generator().manual_seed(1)
    means = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    blob_of = [0, 2, 1, 0, 1, 0, 2, 2, 1, 1, 0, 2, 0, 1, 2, 1, 0, 2, 0, 1, 2]
    features = means[torch.tensor(blob_of)] + 0.3 * torch.randn(len(blob_of), 4, generator=generator)
    cores = {2: [1, 11, 17], 0: [5, 12, 16], 1: [9, 15, 19]}
    for blob, positions in cores.items():
        for position in positions:
            assert blob_of[position] == blob
            features[position] = means[blob]
    return features[None], blob_of, {2: 0, 0: 1, 1: 2}


def test_labels_follow_center_raster_order_when_blobs_are_interleaved():
    features, blob_of, label_of_blob = interleaved_blobs()
    assignment, num_clusters = dpc_knn_cluster(features, k=4, threshold=1.0, fallback_num_clusters=8)
    assert num_clusters.tolist() == [3]
    assert assignment[0].tolist() == [label_of_blob[b] for b in blob_of]
    # and the implementation agrees with the reference on which points are the centers
    expected, count, _ = reference_dpc(features[0].numpy(), 4, 1.0, 8)
    assert count == 3 and assignment[0].tolist() == expected.tolist()


def test_threshold_controls_the_number_of_clusters():
    features = torch.tensor(random_image(np.random.default_rng(3), 48, 6, 4), dtype=torch.float32)[None]
    counts = [int(dpc_knn_cluster(features, k=6, threshold=t, fallback_num_clusters=1)[1]) for t in (0.1, 0.3, 0.6)]
    assert counts[0] > counts[1] > counts[2] >= 1


# ---------------------------------------------------------------------------------------------------------------
# Threshold variant: exact semantics against the reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, k, threshold, fallback, max_num, with_padding",
    [
        (0, 1, 0.6, 4, None, False),
        (1, 3, 0.4, 4, None, True),
        (2, 8, 0.4, 3, None, True),
        (3, 8, 0.2, 5, 6, True),  # many pass: the cap applies
        (4, 5, 0.55, 2, 3, True),
        (5, 64, 0.3, 4, None, True),  # k larger than the image: capped at the real patch count
        (6, 4, 5.0, 3, None, True),  # nothing passes: fallback
        (7, 16, 5.0, 100, None, True),  # fallback larger than N: every real patch is a center
    ],
)
def test_matches_reference_implementation(seed, k, threshold, fallback, max_num, with_padding):
    features, padding, expected = well_conditioned_batch(
        seed,
        batch=4,
        num_patches=30,
        channels=5,
        k=k,
        threshold=threshold,
        fallback=fallback,
        max_num=max_num,
        with_padding=with_padding,
    )
    assignment, num_clusters = dpc_knn_cluster(
        features,
        k=k,
        threshold=threshold,
        fallback_num_clusters=fallback,
        max_num_clusters=max_num,
        padding_mask=padding if with_padding else None,
    )
    for b, (expected_assignment, expected_count) in enumerate(expected):
        assert int(num_clusters[b]) == expected_count, f"image {b}"
        assert assignment[b].tolist() == expected_assignment.tolist(), f"image {b}"
    if fallback == 100:
        assert num_clusters.tolist() == (~padding).sum(-1).tolist()


def test_reference_cases_cover_varied_cluster_counts():
    # Guards the parametrisation above: the random images must give several different counts, not all 1 or all N.
    counts = set()
    for seed in range(3):
        _, _, expected = well_conditioned_batch(seed, 4, 30, 5, 4, 0.4, 4, None, True)
        counts |= {count for _, count in expected}
    assert len(counts) >= 3 and min(counts) < 30


# ---------------------------------------------------------------------------------------------------------------
# Threshold variant: fallback, cap, ties
# ---------------------------------------------------------------------------------------------------------------


def _square_corners():
    # Exactly representable: every density is exactly exp(-1) with k = 2, so all ties are real ties.
    return torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]])


def test_equal_density_resolves_by_lower_index():
    # All densities equal, so patch 0 counts as densest (delta = image max = 2, score 2/e ~ 0.74) and the others
    # get delta = sqrt(2) (score ~ 0.52) from a lower-index neighbour.
    features = _square_corners()
    assignment, num_clusters = dpc_knn_cluster(features, k=2, threshold=0.6, fallback_num_clusters=3)
    assert num_clusters.tolist() == [1] and assignment.tolist() == [[0, 0, 0, 0]]
    assignment, num_clusters = dpc_knn_cluster(features, k=2, threshold=0.5, fallback_num_clusters=3)
    assert num_clusters.tolist() == [4] and assignment.tolist() == [[0, 1, 2, 3]]
    # Fallback of 2: patch 0, then the three-way score tie goes to the lowest index (1). Patch 2 is nearer 0, 3 nearer 1.
    assignment, num_clusters = dpc_knn_cluster(features, k=2, threshold=1.0, fallback_num_clusters=2)
    assert num_clusters.tolist() == [2] and assignment.tolist() == [[0, 1, 0, 1]]
    # Same configuration, patches listed in another order: the lowest index still wins every tie.
    permuted = features[:, [3, 2, 1, 0]]
    assignment, _ = dpc_knn_cluster(permuted, k=2, threshold=1.0, fallback_num_clusters=2)
    assert assignment.tolist() == [[0, 1, 0, 1]]


def test_assignment_tie_goes_to_earlier_center():
    # k = 1: every density is exactly 1. Scores: 2 (densest), 2, 1 -> fallback 2 takes patches 0 and 1; patch 2 is at
    # distance 1 from both and must join the earlier center.
    for features in ([[-1.0], [1.0], [0.0]], [[1.0], [-1.0], [0.0]]):
        assignment, num_clusters = dpc_knn_cluster(
            torch.tensor([features]), k=1, threshold=10.0, fallback_num_clusters=2
        )
        assert num_clusters.tolist() == [2] and assignment.tolist() == [[0, 1, 0]]


def test_score_must_exceed_threshold_strictly():
    # k = 1: densities exactly 1, scores exactly [2, 2, 1].
    features = torch.tensor([[[-1.0], [1.0], [0.0]]])
    assignment, num_clusters = dpc_knn_cluster(features, k=1, threshold=1.0, fallback_num_clusters=3)
    assert num_clusters.tolist() == [2] and assignment.tolist() == [[0, 1, 0]]
    # Nothing exceeds 2: fallback of 1 takes the best score, tie between patches 0 and 1 -> patch 0.
    assignment, num_clusters = dpc_knn_cluster(features, k=1, threshold=2.0, fallback_num_clusters=1)
    assert num_clusters.tolist() == [1] and assignment.tolist() == [[0, 0, 0]]


def test_densest_patch_gets_the_image_wide_largest_distance():
    # Patches at 5, 0, 0, 0, -5 (k = 3): the three zeros are densest (rho = 1 exactly), patch 1 by index. Its delta is
    # the largest distance of the image (10, between the outliers), not its own largest distance (5), so its score
    # 10 passes a threshold of 7 (upstream's per-column maximum would give 5 and fall back to 2 centers).
    features = torch.tensor([[[5.0], [0.0], [0.0], [0.0], [-5.0]]])
    assignment, num_clusters = dpc_knn_cluster(features, k=3, threshold=7.0, fallback_num_clusters=2)
    assert num_clusters.tolist() == [1] and assignment.tolist() == [[0, 0, 0, 0, 0]]
    # Above 10 nothing passes: the fallback takes patch 1 (score 10) and then patch 0 (tied with patch 4 at 5 * rho).
    assignment, num_clusters = dpc_knn_cluster(features, k=3, threshold=10.5, fallback_num_clusters=2)
    assert num_clusters.tolist() == [2] and assignment.tolist() == [[0, 1, 1, 1, 1]]
    # With padding, the image-wide maximum is over real patches only: pad the -5 patch and the largest distance is 5.
    padding = torch.tensor([[False, False, False, False, True]])
    assignment, num_clusters = dpc_knn_cluster(
        features, k=3, threshold=7.0, fallback_num_clusters=2, padding_mask=padding
    )
    assert num_clusters.tolist() == [2] and assignment.tolist() == [[0, 1, 1, 1, -1]]


def test_duplicated_points_are_deterministic():
    base = blob_features(raster_blob_labels(4, 4), channels=4, noise=0.5, seed=3)
    features = torch.cat([base, base, base])[None]  # every point three times
    first = dpc_knn_cluster(features, k=3, threshold=0.3, fallback_num_clusters=4)
    for _ in range(3):
        again = dpc_knn_cluster(features.clone(), k=3, threshold=0.3, fallback_num_clusters=4)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # Copies are at distance 0: the later copies can never be centers (delta = 0) and join their first copy's cluster.
    assignment = first[0][0]
    assert torch.equal(assignment[:16], assignment[16:32]) and torch.equal(assignment[:16], assignment[32:])
    assert sorted(set(assignment[:16].tolist())) == list(range(int(first[1][0])))


def test_fallback_takes_best_scores_and_is_capped_at_n():
    features = torch.tensor(random_image(np.random.default_rng(11), 20, 4, 3), dtype=torch.float32)[None]
    for fallback in (1, 3, 7):
        assignment, num_clusters = dpc_knn_cluster(features, k=4, threshold=1e6, fallback_num_clusters=fallback)
        expected, count, _ = reference_dpc(features[0].numpy(), 4, 1e6, fallback)
        assert num_clusters.tolist() == [fallback] == [count]
        assert assignment[0].tolist() == expected.tolist()
    assignment, num_clusters = dpc_knn_cluster(features, k=4, threshold=1e6, fallback_num_clusters=500)
    assert num_clusters.tolist() == [20] and assignment[0].tolist() == list(range(20))
    # With padding the cap is the number of real patches.
    padding = torch.zeros(1, 20, dtype=torch.bool)
    padding[0, 5:12] = True
    assignment, num_clusters = dpc_knn_cluster(
        features, k=4, threshold=1e6, fallback_num_clusters=500, padding_mask=padding
    )
    assert num_clusters.tolist() == [13]
    assert assignment[0, ~padding[0]].tolist() == list(range(13))


def test_max_num_clusters_keeps_highest_scores():
    labels = raster_blob_labels()
    features = blob_features(labels)[None]
    # Blob cores score ~ separation; every other patch far less. Uncapped: 4 centers.
    for cap in (1, 2, 3):
        assignment, num_clusters = dpc_knn_cluster(features, **DPC, max_num_clusters=cap)
        expected, count, _ = reference_dpc(features[0].numpy(), 4, 1.0, 8, cap)
        assert num_clusters.tolist() == [cap] == [count]
        assert assignment[0].tolist() == expected.tolist()
    assignment, num_clusters = dpc_knn_cluster(features, **DPC, max_num_clusters=10)
    assert num_clusters.tolist() == [4] and assignment[0].tolist() == labels
    # The cap is hard: it also clips a larger fallback count (no score passes 1e6).
    assignment, num_clusters = dpc_knn_cluster(
        features, k=4, threshold=1e6, fallback_num_clusters=5, max_num_clusters=2
    )
    expected, count, _ = reference_dpc(features[0].numpy(), 4, 1e6, 5, 2)
    assert num_clusters.tolist() == [2] == [count]
    assert assignment[0].tolist() == expected.tolist()
    # Low threshold: most patches pass, the cap keeps exactly `cap` of them.
    many = torch.tensor(random_image(np.random.default_rng(5), 40, 4, 3), dtype=torch.float32)[None]
    uncapped = int(dpc_knn_cluster(many, k=2, threshold=0.05, fallback_num_clusters=1)[1])
    assert uncapped > 10
    assignment, num_clusters = dpc_knn_cluster(many, k=2, threshold=0.05, fallback_num_clusters=1, max_num_clusters=10)
    expected, count, _ = reference_dpc(many[0].numpy(), 2, 0.05, 1, 10)
    assert num_clusters.tolist() == [10] == [count]
    assert assignment[0].tolist() == expected.tolist()


@pytest.mark.parametrize("with_padding", [False, True])
def test_max_num_clusters_is_a_hard_cap_on_the_fallback(with_padding):
    # Issue 12: max_num_clusters=32 with fallback_num_clusters=64 and no score over the threshold gave 64 clusters.
    # The cap wins: the 32 best scores, numbered in patch order, exactly as the reference.
    features, padding, expected = well_conditioned_batch(
        seed=12,
        batch=3,
        num_patches=70,
        channels=4,
        k=6,
        threshold=1e6,
        fallback=64,
        max_num=32,
        with_padding=with_padding,
    )
    assignment, num_clusters = dpc_knn_cluster(
        features,
        k=6,
        threshold=1e6,
        fallback_num_clusters=64,
        max_num_clusters=32,
        padding_mask=padding if with_padding else None,
    )
    assert (num_clusters <= 32).all()
    for b, (expected_assignment, expected_count) in enumerate(expected):
        assert int(num_clusters[b]) == expected_count == min(32, int((~padding[b]).sum())), f"image {b}"
        assert assignment[b].tolist() == expected_assignment.tolist(), f"image {b}"
    # The same batch uncapped takes the 64 fallback centers (or every real patch): the cap really did bind.
    uncapped = dpc_knn_cluster(
        features, k=6, threshold=1e6, fallback_num_clusters=64, padding_mask=padding if with_padding else None
    )[1]
    assert (uncapped > 32).all()


@pytest.mark.parametrize("threshold, fallback", [(0.05, 1), (0.3, 3), (1e6, 50), (1e6, 1)])
@pytest.mark.parametrize("cap", [1, 2, 5, 7])
def test_token_count_never_exceeds_max_num_clusters(threshold, fallback, cap):
    features, padding = _random_batch(seed=13, batch=6)
    assignment, num_clusters = dpc_knn_cluster(
        features, k=4, threshold=threshold, fallback_num_clusters=fallback, max_num_clusters=cap, padding_mask=padding
    )
    assert (num_clusters >= 1).all() and (num_clusters <= cap).all()
    assert (num_clusters == min(fallback, cap)).all() or threshold < 1e6
    for b in range(6):
        assert sorted(set(assignment[b, ~padding[b]].tolist())) == list(range(int(num_clusters[b])))
    # The capped centers are the best-scoring of the uncapped choice (a cap never adds a center)...
    free_assignment, free_counts = dpc_knn_cluster(
        features, k=4, threshold=threshold, fallback_num_clusters=fallback, padding_mask=padding
    )
    assert torch.equal(num_clusters, free_counts.clamp(max=cap))
    # ... and the iterative variant obeys the same cap, its leftover cluster included.
    for stop_mass in (0.05, 0.45, 0.9):
        counts = iterative_cluster(features, k=4, max_num_clusters=cap, stop_mass=stop_mass, padding_mask=padding)[1]
        assert (counts >= 1).all() and (counts <= cap).all()


# ---------------------------------------------------------------------------------------------------------------
# Threshold variant: batching, chunking, padding, dtypes
# ---------------------------------------------------------------------------------------------------------------


def _random_batch(seed=0, batch=8, num_patches=36, channels=6):
    rng = np.random.default_rng(seed)
    images = [random_image(rng, num_patches, channels, int(rng.integers(1, 6))) for _ in range(batch)]
    padding = torch.zeros(batch, num_patches, dtype=torch.bool)
    for b in range(1, batch):
        padding[b, num_patches - 3 * b :] = True
    return torch.tensor(np.stack(images), dtype=torch.float32), padding


def test_chunking_gives_identical_results():
    features, padding = _random_batch()
    full = dpc_knn_cluster(features, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding)
    for chunk_size in (1, 3, 8, 100):
        chunked = dpc_knn_cluster(
            features, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding, chunk_size=chunk_size
        )
        assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])
    assert len(set(full[1].tolist())) > 1  # the batch really is heterogeneous


def test_image_alone_equals_image_in_batch():
    features, padding = _random_batch(seed=1)
    batched, counts = dpc_knn_cluster(features, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding)
    for b in (0, 3, 7):
        real = ~padding[b]
        alone, count = dpc_knn_cluster(features[b : b + 1, real], k=5, threshold=0.4, fallback_num_clusters=3)
        assert int(count) == int(counts[b])
        assert torch.equal(alone[0], batched[b, real])


@pytest.mark.parametrize("junk", ["zeros", "huge", "random", "nan", "copy_of_real"])
def test_padding_values_never_matter(junk):
    features, _ = _random_batch(seed=2, batch=3)
    padding = torch.zeros(3, 36, dtype=torch.bool)
    padding[0, 30:] = True
    padding[1, ::3] = True
    padding[2, :20] = True
    reference = dpc_knn_cluster(features, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding)
    altered = features.clone()
    fill = {
        "zeros": torch.zeros(int(padding.sum()), 6),
        "huge": torch.full((int(padding.sum()), 6), 1e6),
        "random": 100 * torch.randn(int(padding.sum()), 6),
        "nan": torch.full((int(padding.sum()), 6), float("nan")),
        "copy_of_real": features[0, 0].expand(int(padding.sum()), 6),
    }[junk]
    altered[padding] = fill
    assignment, num_clusters = dpc_knn_cluster(
        altered, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding
    )
    assert torch.equal(assignment, reference[0]) and torch.equal(num_clusters, reference[1])
    assert (assignment[padding] == -1).all() and (assignment[~padding] >= 0).all()
    for b in range(3):
        assert int(assignment[b].max()) == int(num_clusters[b]) - 1


def test_padding_mask_accepts_non_bool_dtype():
    features, padding = _random_batch(seed=4, batch=3)
    expected = dpc_knn_cluster(features, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding)
    got = dpc_knn_cluster(features, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding.long())
    assert torch.equal(expected[0], got[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_computed_in_float32(dtype):
    features, padding = _random_batch(seed=3)
    low = features.to(dtype)
    got = dpc_knn_cluster(low, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding)
    expected = dpc_knn_cluster(low.float(), k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[0].dtype == torch.int64


def test_float64_input_works():
    labels = raster_blob_labels()
    assignment, num_clusters = dpc_knn_cluster(blob_features(labels)[None].double(), **DPC)
    assert num_clusters.tolist() == [4] and assignment[0].tolist() == labels


# ---------------------------------------------------------------------------------------------------------------
# Iterative variant (spec 1.3)
# ---------------------------------------------------------------------------------------------------------------


def test_iterative_recovers_blobs_in_raster_order():
    labels = raster_blob_labels()
    features = blob_features(labels)[None]
    assignment, num_clusters = iterative_cluster(features, k=4, max_num_clusters=10)
    assert num_clusters.tolist() == [4]
    assert assignment[0].tolist() == labels


def test_iterative_recovers_interleaved_blobs():
    # Seeds are the blob cores (highest rho * delta); clusters are numbered by the seeds' raster positions.
    features, blob_of, label_of_blob = interleaved_blobs()
    assignment, num_clusters = iterative_cluster(features, k=4, max_num_clusters=8)
    assert num_clusters.tolist() == [3]
    assert assignment[0].tolist() == [label_of_blob[b] for b in blob_of]


@pytest.mark.parametrize("stop_mass, num_seeded", [(0.6, 2), (0.45, 3)])
def test_iterative_leftover_scope_forms_the_last_cluster(stop_mass, num_seeded):
    # Four blobs of 16 patches (bands of two rows); each seed claims one whole blob. With stop_mass 0.6 the loop stops once less than
    # 0.6 * 64 of the scope is unclaimed (after 2 seeds), with 0.45 after 3; the unclaimed blobs form one more cluster,
    # numbered last.
    labels = raster_blob_labels()
    assignment, num_clusters = iterative_cluster(
        blob_features(labels)[None], k=4, max_num_clusters=10, stop_mass=stop_mass
    )
    assert num_clusters.tolist() == [num_seeded + 1]
    blobs_of_label = {}
    for blob, label in zip(labels, assignment[0].tolist()):
        blobs_of_label.setdefault(label, set()).add(blob)
    assert [len(blobs_of_label[label]) for label in range(num_seeded)] == [1] * num_seeded
    assert len(blobs_of_label[num_seeded]) == 4 - num_seeded  # the leftover cluster holds all unclaimed blobs
    # seeded clusters are numbered in raster order of their seeds (each seed lies in its blob; blobs are raster bands)
    firsts = [min(blobs_of_label[label]) for label in range(num_seeded)]
    assert firsts == sorted(firsts)


@pytest.mark.parametrize("cap", [1, 2, 3, 5])
def test_iterative_respects_max_num_clusters(cap):
    features, padding = _random_batch(seed=6, batch=4)
    assignment, num_clusters = iterative_cluster(features, k=4, max_num_clusters=cap, padding_mask=padding)
    assert (num_clusters >= 1).all() and (num_clusters <= cap).all()
    for b in range(4):
        real = assignment[b, ~padding[b]]
        assert sorted(set(real.tolist())) == list(range(int(num_clusters[b])))
        assert (assignment[b, padding[b]] == -1).all()
    blobs = blob_features(raster_blob_labels())[None]
    assert iterative_cluster(blobs, k=4, max_num_clusters=cap)[1].tolist() == [min(cap, 4)]


def test_iterative_is_deterministic_and_batch_invariant():
    features, padding = _mixed_batch()
    first = iterative_cluster(features, k=4, max_num_clusters=6, padding_mask=padding)
    again = iterative_cluster(features.clone(), k=4, max_num_clusters=6, padding_mask=padding)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    chunked = iterative_cluster(features, k=4, max_num_clusters=6, padding_mask=padding, chunk_size=3)
    assert torch.equal(first[0], chunked[0]) and torch.equal(first[1], chunked[1])
    for b in (0, 2, 4):
        real = ~padding[b]
        alone, count = iterative_cluster(features[b : b + 1, real], k=4, max_num_clusters=6)
        assert int(count) == int(first[1][b]) and torch.equal(alone[0], first[0][b, real])


def test_iterative_ties_are_deterministic():
    features = torch.cat([_square_corners(), _square_corners()], dim=1)  # every point twice, all scores tied
    results = [iterative_cluster(features.clone(), k=2, max_num_clusters=4) for _ in range(3)]
    for assignment, num_clusters in results[1:]:
        assert torch.equal(assignment, results[0][0]) and torch.equal(num_clusters, results[0][1])
    assignment = results[0][0][0]
    assert torch.equal(assignment[:4], assignment[4:])  # exact copies always share a cluster


def _mixed_batch():
    """Five images of 36 patches: one unstructured, four made of 2, 3, 1 and 4 blobs (the last one padded)."""
    features, padding = _random_batch(seed=8, batch=5)
    rng = np.random.default_rng(0)
    for b, num_blobs in [(1, 2), (2, 3), (3, 1), (4, 4)]:
        labels = rng.integers(0, num_blobs, 36).tolist()
        labels[:num_blobs] = list(range(num_blobs))
        features[b] = blob_features(labels, channels=6, seed=b)
    return features, padding


def test_iterative_soft_assignment():
    features, padding = _mixed_batch()
    assignment, num_clusters, soft = iterative_cluster(
        features, k=4, max_num_clusters=6, padding_mask=padding, return_soft_assignment=True
    )
    batch, num_patches = padding.shape
    assert soft.shape == (batch, int(num_clusters.max()), num_patches)
    assert soft.dtype == torch.float32 and (soft >= 0).all() and (soft <= 1 + 1e-6).all()
    assert len(set(num_clusters.tolist())) >= 3  # rows past a count exist for some images
    real = ~padding
    assert torch.equal(soft.argmax(1)[real], assignment[real])
    for b in range(batch):
        assert (soft[b, int(num_clusters[b]) :] == 0).all(), "rows past an image's cluster count are padding"
        assert (soft[b][:, padding[b]] == 0).all()
    # The hard-only call gives the same hard result.
    hard = iterative_cluster(features, k=4, max_num_clusters=6, padding_mask=padding)
    assert torch.equal(hard[0], assignment) and torch.equal(hard[1], num_clusters)
    # Chunking does not change the soft masks either.
    chunked = iterative_cluster(
        features, k=4, max_num_clusters=6, padding_mask=padding, return_soft_assignment=True, chunk_size=2
    )
    assert torch.equal(chunked[2], soft)


def test_iterative_soft_assignment_on_blobs():
    labels = raster_blob_labels()
    assignment, num_clusters, soft = iterative_cluster(
        blob_features(labels)[None], k=4, max_num_clusters=10, return_soft_assignment=True
    )
    assert soft.shape == (1, 4, 64)
    assert soft[0].argmax(0).tolist() == labels == assignment[0].tolist()
    # Each patch belongs almost entirely to its own blob's mask.
    own = soft[0].gather(0, torch.tensor(labels)[None])[0]
    assert (own > 0.9).all()


def test_iterative_padding_values_never_matter():
    features, padding = _random_batch(seed=9, batch=3)
    reference = iterative_cluster(features, k=4, max_num_clusters=5, padding_mask=padding)
    altered = features.clone()
    altered[padding] = 1e4
    got = iterative_cluster(altered, k=4, max_num_clusters=5, padding_mask=padding)
    assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

GOOD = torch.randn(2, 9, 4)
DPC_ARGUMENTS = dict(k=3, threshold=0.5, fallback_num_clusters=2)
ITERATIVE_ARGUMENTS = dict(k=3, max_num_clusters=4)

# (features, arguments that differ from DPC_ARGUMENTS, error, message pattern). Later features add their rows here.
DPC_BAD_INPUTS = [
    (GOOD.numpy(), {}, TypeError, "features"),
    ([[[0.0]]], {}, TypeError, "features"),
    (GOOD[0], {}, ValueError, "features"),
    (GOOD[None], {}, ValueError, "features"),
    (torch.zeros(0, 9, 4), {}, ValueError, "features"),
    (torch.zeros(2, 0, 4), {}, ValueError, "features"),
    (
        GOOD.clone().index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(float("nan"))),
        {},
        ValueError,
        "features",
    ),
    (
        GOOD.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))),
        {},
        ValueError,
        "features",
    ),
    (torch.ones(2, 9, 4, dtype=torch.long), {}, TypeError, "features"),
    (GOOD * 1e20, {}, ValueError, "`features` are too large"),  # finite, but the squared distances overflow float32
    (GOOD, {"k": 0}, ValueError, "`k`"),
    (GOOD, {"k": -3}, ValueError, "`k`"),
    (GOOD, {"k": 2.5}, (ValueError, TypeError), "`k`"),
    (GOOD, {"k": True}, (ValueError, TypeError), "`k`"),
    (GOOD, {"k": None}, (ValueError, TypeError), "`k`"),
    # numpy and 0-d tensor numbers are accepted, but only when their value is: the message shows the input as given
    (GOOD, {"k": np.int64(0)}, ValueError, r"`k` must be a positive integer, got np\.int64\(0\)"),
    (GOOD, {"k": torch.tensor(0)}, ValueError, r"`k` must be a positive integer, got tensor\(0\)"),
    (GOOD, {"k": np.float64(3.0)}, ValueError, "`k`"),
    (GOOD, {"k": torch.tensor(3.0)}, ValueError, "`k`"),
    (GOOD, {"k": torch.tensor([3])}, ValueError, "`k`"),  # a 1-element tensor is not a number
    (GOOD, {"k": np.array([3])}, ValueError, "`k`"),
    (GOOD, {"k": torch.tensor(True)}, ValueError, "`k`"),
    (GOOD, {"k": np.bool_(True)}, ValueError, "`k`"),
    (GOOD, {"k": "3"}, ValueError, "`k`"),
    (GOOD, {"fallback_num_clusters": 0}, ValueError, "fallback_num_clusters"),
    (GOOD, {"fallback_num_clusters": np.uint8(0)}, ValueError, "fallback_num_clusters"),
    (GOOD, {"fallback_num_clusters": None}, ValueError, "fallback_num_clusters"),
    (GOOD, {"max_num_clusters": 0}, ValueError, "max_num_clusters"),
    (GOOD, {"max_num_clusters": -1}, ValueError, "max_num_clusters"),
    (GOOD, {"max_num_clusters": np.int64(0)}, ValueError, r"max_num_clusters.*np\.int64\(0\)"),
    (GOOD, {"max_num_clusters": torch.tensor(1.5)}, ValueError, "max_num_clusters"),
    (GOOD, {"chunk_size": 0}, ValueError, "chunk_size"),
    (GOOD, {"chunk_size": torch.tensor(0)}, ValueError, "chunk_size"),
    (GOOD, {"padding_mask": torch.zeros(2, 8, dtype=torch.bool)}, ValueError, "padding_mask"),
    (GOOD, {"padding_mask": torch.zeros(9, dtype=torch.bool)}, ValueError, "padding_mask"),
    (GOOD, {"padding_mask": np.zeros((2, 9), dtype=bool)}, (ValueError, TypeError), "padding_mask"),
    (GOOD, {"padding_mask": torch.tensor([[False] * 9, [True] * 9])}, ValueError, "padding_mask"),
    (GOOD, {"threshold": float("nan")}, ValueError, "threshold"),
    (GOOD, {"threshold": float("inf")}, ValueError, "threshold"),
    (GOOD, {"threshold": "0.5"}, (ValueError, TypeError), "threshold"),
    (GOOD, {"threshold": None}, (ValueError, TypeError), "threshold"),
    (GOOD, {"threshold": True}, ValueError, "threshold"),
    (GOOD, {"threshold": torch.tensor(float("nan"))}, ValueError, r"threshold.*got tensor\(nan\)"),
    (GOOD, {"threshold": np.float32("inf")}, ValueError, "threshold"),
    (GOOD, {"threshold": torch.tensor([0.5])}, ValueError, "threshold"),
    (GOOD, {"threshold": torch.tensor(True)}, ValueError, "threshold"),
    (GOOD, {"threshold": 1j}, ValueError, "threshold"),
]

ITERATIVE_BAD_INPUTS = [
    ("not a tensor", {}, TypeError, "features"),
    (torch.zeros(0, 9, 4), {}, ValueError, "features"),
    (torch.full((1, 9, 4), float("nan")), {}, ValueError, "features"),
    (torch.ones(1, 9, 4, dtype=torch.int32), {}, TypeError, "features"),
    (GOOD, {"k": 0}, ValueError, "`k`"),
    (GOOD, {"k": np.int32(-1)}, ValueError, r"`k`.*np\.int32\(-1\)"),
    (GOOD, {"max_num_clusters": 0}, ValueError, "max_num_clusters"),
    (GOOD, {"max_num_clusters": None}, (ValueError, TypeError), "max_num_clusters"),
    (GOOD, {"max_num_clusters": torch.tensor(0)}, ValueError, "max_num_clusters"),
    (GOOD, {"chunk_size": np.int64(0)}, ValueError, "chunk_size"),
    (GOOD, {"bandwidth_scale": 0.0}, ValueError, "bandwidth_scale"),
    (GOOD, {"bandwidth_scale": torch.tensor(-1.0)}, ValueError, "bandwidth_scale"),
    (GOOD, {"bandwidth_scale": float("inf")}, ValueError, "bandwidth_scale"),
    (GOOD, {"bandwidth_scale": "0.1"}, ValueError, "bandwidth_scale"),
    (GOOD, {"stop_mass": 1.5}, ValueError, "stop_mass"),
    (GOOD, {"stop_mass": np.float64(1.0)}, ValueError, "stop_mass"),
    (GOOD, {"stop_mass": torch.tensor(0.0)}, ValueError, "stop_mass"),
    (GOOD, {"stop_mass": None}, ValueError, "stop_mass"),
    (GOOD, {"padding_mask": torch.ones(2, 9, dtype=torch.bool)}, ValueError, "padding_mask"),
]


@pytest.mark.parametrize("features, kwargs, error, match", DPC_BAD_INPUTS)
def test_dpc_rejects_bad_input(features, kwargs, error, match):
    with pytest.raises(error, match=match):
        dpc_knn_cluster(features, **(DPC_ARGUMENTS | kwargs))


@pytest.mark.parametrize("features, kwargs, error, match", ITERATIVE_BAD_INPUTS)
def test_iterative_rejects_bad_input(features, kwargs, error, match):
    with pytest.raises(error, match=match):
        iterative_cluster(features, **(ITERATIVE_ARGUMENTS | kwargs))


# (argument, value): numpy and 0-d tensor numbers accepted wherever a Python number is. Extend as arguments appear.
DPC_NUMBER_INPUTS = [
    ("k", np.int64(3)),
    ("k", np.int32(3)),
    ("k", np.uint16(3)),
    ("k", np.array(3)),
    ("k", torch.tensor(3)),
    ("k", torch.tensor(3, dtype=torch.int32)),
    ("threshold", np.float32(0.5)),
    ("threshold", np.float64(0.5)),
    ("threshold", np.int64(0)),
    ("threshold", 0),
    ("threshold", torch.tensor(0.5)),
    ("threshold", torch.tensor(0.5, dtype=torch.float64)),
    ("threshold", torch.tensor(0.5, dtype=torch.bfloat16)),
    ("fallback_num_clusters", np.int64(2)),
    ("fallback_num_clusters", torch.tensor(2)),
    ("max_num_clusters", np.int64(1)),
    ("max_num_clusters", torch.tensor(1)),
    ("chunk_size", np.int64(1)),
    ("chunk_size", torch.tensor(1)),
]
ITERATIVE_NUMBER_INPUTS = [
    ("k", np.int64(3)),
    ("k", torch.tensor(3)),
    ("max_num_clusters", np.int64(2)),
    ("max_num_clusters", torch.tensor(2)),
    ("bandwidth_scale", np.float32(0.5)),
    ("bandwidth_scale", torch.tensor(0.5)),
    ("bandwidth_scale", 1),
    ("stop_mass", np.float64(0.2)),
    ("stop_mass", torch.tensor(0.2)),
    ("chunk_size", np.int64(1)),
    ("chunk_size", torch.tensor(1)),
]


def _python(value):
    return value.item() if isinstance(value, (np.generic, np.ndarray, torch.Tensor)) else value


@pytest.mark.parametrize("name, value", DPC_NUMBER_INPUTS)
def test_dpc_accepts_numpy_and_tensor_numbers(name, value):
    expected = dpc_knn_cluster(GOOD, **(DPC_ARGUMENTS | {name: _python(value)}))
    got = dpc_knn_cluster(GOOD, **(DPC_ARGUMENTS | {name: value}))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("name, value", ITERATIVE_NUMBER_INPUTS)
def test_iterative_accepts_numpy_and_tensor_numbers(name, value):
    expected = iterative_cluster(GOOD, **(ITERATIVE_ARGUMENTS | {name: _python(value)}))
    got = iterative_cluster(GOOD, **(ITERATIVE_ARGUMENTS | {name: value}))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("cluster_k", np.int64(3), 3),
        ("cluster_k", torch.tensor(3), 3),
        ("cluster_fallback_num_clusters", np.int32(4), 4),
        ("max_num_clusters", np.int64(8), 8),
        ("max_num_clusters", None, None),
        ("cluster_chunk_size", torch.tensor(2), 2),
        ("cluster_threshold", np.float32(0.25), 0.25),
        ("cluster_threshold", torch.tensor(0.5), 0.5),
        ("iterative_bandwidth_scale", np.float64(0.2), 0.2),
        ("iterative_stop_mass", torch.tensor(0.125), 0.125),
    ],
)
def test_config_clustering_fields_accept_numpy_and_tensor_numbers(name, value, expected):
    config = SetokConfig(**{name: value})
    assert getattr(config, name) == expected and type(getattr(config, name)) is type(expected)
    assert json.loads(config.to_json_string())[name] == expected  # stored as Python numbers: serialisable


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cluster_k=np.int64(0)), "`cluster_k` must be a positive integer"),
        (dict(cluster_k=torch.tensor(2.5)), r"`cluster_k` must be a positive integer, got tensor\(2\.5000\)"),
        (dict(max_num_clusters=np.int64(0)), "`max_num_clusters` must be a positive integer"),
        (dict(cluster_chunk_size=np.bool_(True)), "`cluster_chunk_size` must be a positive integer"),
    ],
)
def test_config_rejects_bad_clustering_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SetokConfig(**kwargs)


def test_config_accepts_a_fallback_above_the_cap():
    # Documented: the cap is hard and clips the fallback, so this pair is valid (not silently exceeding the cap).
    config = SetokConfig(max_num_clusters=4, cluster_fallback_num_clusters=64)
    assert (config.max_num_clusters, config.cluster_fallback_num_clusters) == (4, 64)


def test_nan_in_a_real_patch_is_rejected_even_with_padding_elsewhere():
    features = GOOD.clone()
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 5:] = True
    features[1, 2, 0] = float("nan")  # real position
    with pytest.raises(ValueError, match="features"):
        dpc_knn_cluster(features, k=3, threshold=0.5, fallback_num_clusters=2, padding_mask=padding)


# ---------------------------------------------------------------------------------------------------------------
# 2D sine-cosine position embedding
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, dim", [(8, 8, 32), (27, 27, 1152), (3, 5, 16), (5, 3, 30), (1, 7, 8)])
def test_position_embedding_shape_and_range(height, width, dim):
    embedding = sincos_position_embedding_2d(height, width, dim)
    assert embedding.shape == (height * width, dim)
    assert embedding.dtype == torch.float32
    assert torch.isfinite(embedding).all() and embedding.abs().max() <= 1
    # every position is distinct
    assert torch.cdist(embedding, embedding).add(torch.eye(height * width) * 10).min() > 1e-3


@pytest.mark.parametrize("height, width, dim", [(8, 8, 32), (4, 7, 24), (7, 4, 26), (3, 5, 1152)])
def test_position_embedding_encodes_both_axes(height, width, dim):
    embedding = sincos_position_embedding_2d(height, width, dim).view(height, width, dim)
    # Two patches of one column differ (the row is encoded) ...
    for c in range(width):
        for r in range(1, height):
            assert (embedding[r, c] - embedding[0, c]).abs().max() > 1e-3
    # ... and two patches of one row differ (the column is encoded; a one-axis table would make these equal).
    for r in range(height):
        for c in range(1, width):
            assert (embedding[r, c] - embedding[r, 0]).abs().max() > 1e-3
    # Both axes are encoded alike: a unit step along a row moves as far as a unit step along a column, wherever it is.
    row_step = (embedding[1:, :] - embedding[:-1, :]).norm(dim=-1)
    col_step = (embedding[:, 1:] - embedding[:, :-1]).norm(dim=-1)
    assert torch.allclose(row_step, row_step[0, 0].expand_as(row_step), atol=1e-4)
    assert torch.allclose(col_step, row_step[0, 0].expand_as(col_step), atol=1e-4)
    # Separable like the usual MAE / TCFormer table: the difference between two columns is the same in every row,
    # and the difference between two rows the same in every column.
    col_diff = embedding[:, 1:] - embedding[:, :1]
    row_diff = embedding[1:, :] - embedding[:1, :]
    assert (col_diff - col_diff[:1]).abs().max() < 1e-5
    assert (row_diff - row_diff[:, :1]).abs().max() < 1e-5


def test_position_embedding_matches_image_grid_for_the_default_encoder():
    # SigLIP so400m-patch14-384: 27 x 27 patches of width 1152 (spec 1.1).
    embedding = sincos_position_embedding_2d(27, 27, 1152)
    assert embedding.shape == (729, 1152)
    assert embedding.abs().sum(0).gt(0).all()  # 1152 is a multiple of 4: no channel is left empty


@pytest.mark.parametrize("k", [1, 5, 36, 64])
def test_k_smallest_matches_topk(k):
    # The CPU path (numpy.partition, then a sort) gives exactly torch.topk's sorted values, ties and +inf included.
    generator = torch.Generator().manual_seed(k)
    squared = torch.rand(3, 64, 64, generator=generator).round(decimals=1)  # many exact ties
    squared[1, :, 40:] = math.inf  # padding columns
    expected = squared.topk(k, dim=-1, largest=False, sorted=True).values
    assert torch.equal(clustering._k_smallest(squared, k), expected)
    with ThreadPoolExecutor(3) as pool:  # rows split among threads
        assert torch.equal(clustering._k_smallest(squared, k, pool, 3), expected)


def test_symmetric_gram_matches_the_plain_product():
    # On the CPU, from N ~ 384 on, only the upper triangle of row blocks of x @ x^T is multiplied and then mirrored.
    x = torch.randn(2, 520, 16, generator=torch.Generator().manual_seed(17))
    gram = clustering._gram(x, torch.empty(2, 520, 520))
    assert torch.equal(gram, gram.mT)
    torch.testing.assert_close(gram, x @ x.mT, rtol=1e-6, atol=1e-5)


def test_partition_threads_do_not_change_the_result(monkeypatch):
    # From N = 256 on the CPU, numpy.partition runs in threads; a single thread gives the same labels.
    features = torch.tensor(random_image(np.random.default_rng(16), 2 * 300, 6, 5), dtype=torch.float32).view(
        2, 300, 6
    )
    arguments = dict(k=16, threshold=0.3, fallback_num_clusters=8)
    assert clustering._partition_workers(features, 16) == min(torch.get_num_threads(), 8)
    threaded = dpc_knn_cluster(features, **arguments)
    monkeypatch.setattr(clustering, "_partition_workers", lambda features, k_smallest: 1)
    single = dpc_knn_cluster(features, **arguments)
    assert torch.equal(threaded[0], single[0]) and torch.equal(threaded[1], single[1])


@pytest.mark.parametrize("with_padding", [False, True])
def test_cpu_blocks_do_not_change_the_result(monkeypatch, with_padding):
    # On the CPU the passes over the distance matrix go block by block of images; one image per block must give the
    # labels (and soft masks) of one block for the whole batch.
    features, padding = _random_batch(seed=15, batch=5)
    padding = padding if with_padding else None
    results = []
    for block_bytes in (2**40, 1):
        monkeypatch.setattr(clustering, "_CPU_BLOCK_BYTES", block_bytes)
        results.append(
            (
                dpc_knn_cluster(features, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding),
                iterative_cluster(
                    features, k=5, max_num_clusters=4, padding_mask=padding, return_soft_assignment=True
                ),
            )
        )
    (dpc_whole, iterative_whole), (dpc_blocks, iterative_blocks) = results
    assert all(torch.equal(a, b) for a, b in zip(dpc_whole, dpc_blocks))
    assert all(torch.equal(a, b) for a, b in zip(iterative_whole, iterative_blocks))


def test_unpadded_and_all_real_padding_mask_agree_with_the_padded_path():
    # The unmasked fast path and the masked path (an image with padding in the batch) give the same labels.
    features, padding = _random_batch(seed=14, batch=4)
    padding[1:] = False
    padding[3, -5:] = True  # one padded image forces the masked path for the whole batch
    masked = dpc_knn_cluster(features, k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=padding)
    unmasked = dpc_knn_cluster(features[:3], k=5, threshold=0.4, fallback_num_clusters=3)
    all_real = dpc_knn_cluster(
        features[:3], k=5, threshold=0.4, fallback_num_clusters=3, padding_mask=torch.zeros(3, 36, dtype=torch.bool)
    )
    assert torch.equal(masked[0][:3], unmasked[0]) and torch.equal(masked[1][:3], unmasked[1])
    assert torch.equal(all_real[0], unmasked[0]) and torch.equal(all_real[1], unmasked[1])


def test_distances_stay_accurate_under_a_large_shared_offset():
    spread = torch.randn(2, 50, 16, dtype=torch.float64) * 0.05
    exact = torch.cdist(spread, spread) / 4
    offset = (spread + 30.0).float()
    distances = pairwise_distances(offset, torch.ones(2, 50, dtype=torch.bool))
    torch.testing.assert_close(distances.double(), exact, atol=1e-5, rtol=0)
