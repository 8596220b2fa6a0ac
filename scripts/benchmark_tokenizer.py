"""Benchmark SeTok's tokenizer forward at the paper's scale (random weights, eval, inference mode, sdpa).

Per batch size it times the SigLIP so400m encoder alone (`get_patch_features`), the full `SetokModel` forward, the
clustering alone (`cluster_patches` on position-embedded float32 features) and the merger alone, and derives SeTok's
own share `(full - encoder) / encoder` (target: <= 15% at batch 8). It also reports images/s, the peak memory of one
full forward (CUDA: `torch.cuda.max_memory_allocated`; CPU: peak-RSS increase in a fresh child process) and the mean
token count (random weights and pixels: the count is not meaningful).

Timing: `--warmup` untimed full forwards, then rounds that each time every part once (interleaved, so load drift hits
all parts alike); medians are reported. `--repeats` rounds (default 3), except on CPU for batch sizes >= 8, which get
`--cpu-large-batch-repeats` (default 2): one so400m forward at batch 8 takes ~40-90 s on a 2-core CPU, and this keeps
the default run under ~12 minutes there.

It then benchmarks the token cluster alone at the paper's size (`--cluster-batch` 32 images of a 27 x 27 grid of
1152-wide random features plus the position embedding; `k=64, threshold=0.5, fallback_num_clusters=64`; the
iterative variant with `max_num_clusters=64`): the batched functions against a plain per-image loop of the same
semantics (one `torch.cdist` per image, then top-k, delta and argmin) and against the bare distance matmul
`x @ x.mT`, with their ratios, peak memory (same method as above, one fresh child process per variant) and whether
the labels agree. `--cluster-reference FILE` adds another implementation of the two functions to the same rounds, e.g.
a previous version of `clustering_setok.py` taken from git. `--cluster-only` runs just this part (about a minute).

    python scripts/benchmark_tokenizer.py                          # batch 1 and 8, float32, cuda if available
    python scripts/benchmark_tokenizer.py --device cpu --threads 2 --batch-sizes 1 --repeats 5
    python scripts/benchmark_tokenizer.py --cluster-only --threads 2
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from transformers_setok import (
    SetokConfig,
    SetokModel,
    dpc_knn_cluster,
    iterative_cluster,
    sincos_position_embedding_2d,
)

TARGET_RATIO, TARGET_BATCH = 0.15, 8
PARTS = ("encoder", "full", "cluster", "merger")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (median reported)")
    parser.add_argument("--cpu-large-batch-repeats", type=int, default=2, help="rounds on CPU for batch >= 8")
    parser.add_argument("--warmup", type=int, default=1, help="untimed full forwards per batch size (>= 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-out"))
    parser.add_argument("--measure-memory", type=int, metavar="BATCH", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--cluster-only", action="store_true", help="run only the token-cluster benchmark")
    parser.add_argument("--cluster-batch", type=int, default=32, help="images in the token-cluster benchmark")
    parser.add_argument("--cluster-grid", type=int, default=27, help="patches per side there (27: N = 729)")
    parser.add_argument("--cluster-channels", type=int, default=1152, help="feature width there")
    parser.add_argument("--cluster-repeats", type=int, default=5, help="timed rounds there (median reported)")
    parser.add_argument(
        "--cluster-reference", type=Path, help="a .py file with dpc_knn_cluster/iterative_cluster to compare with"
    )
    parser.add_argument("--measure-cluster-memory", metavar="VARIANT", help=argparse.SUPPRESS)  # child mode
    return parser.parse_args(argv)


def build_model(args) -> SetokModel:
    torch.manual_seed(0)
    return SetokModel(SetokConfig()).eval().to(device=args.device, dtype=getattr(torch, args.dtype))


def make_pixels(batch: int, model: SetokModel) -> torch.Tensor:
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    return pixels.to(model.device, model.dtype)


def timed(fn, device: str) -> float:
    """Seconds of one call; on GPU, queued work is synchronised before and after."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def part_calls(model: SetokModel, pixels: torch.Tensor):
    """The timed callables and the mean token count; cluster/merger inputs come from one untimed full forward."""
    output = model(pixels, output_patch_features=True)
    features = model.embed_positions(output.patch_features)
    assignment, num_clusters = model.cluster_patches(features.float())
    calls = {
        "encoder": lambda: model.get_patch_features(pixels),
        "full": lambda: model(pixels),
        "cluster": lambda: model.cluster_patches(features.float()),
        "merger": lambda: model.merger(features, assignment, num_clusters),
    }
    return calls, output.num_tokens.float().mean().item()


def time_batch(model: SetokModel, batch: int, args) -> dict:
    pixels = make_pixels(batch, model)
    repeats = args.cpu_large_batch_repeats if args.device == "cpu" and batch >= 8 else args.repeats
    samples = {part: [] for part in PARTS}
    with torch.inference_mode():
        for _ in range(args.warmup - 1):
            model(pixels)
        calls, mean_tokens = part_calls(model, pixels)
        for round_index in range(repeats):
            for part in PARTS:
                samples[part].append(timed(calls[part], args.device))
            print(
                f"  round {round_index + 1}/{repeats}: " + ", ".join(f"{p} {samples[p][-1]:.3f} s" for p in PARTS),
                flush=True,
            )
    medians = {f"{part}_s": statistics.median(values) for part, values in samples.items()}
    setok_s = medians["full_s"] - medians["encoder_s"]
    return {
        "batch_size": batch,
        "repeats": repeats,
        **medians,
        "samples_s": samples,
        "setok_s": setok_s,
        "setok_ratio": setok_s / medians["encoder_s"],
        "cluster_merger_ratio": (medians["cluster_s"] + medians["merger_s"]) / medians["encoder_s"],
        "images_per_s": batch / medians["full_s"],
        "mean_num_tokens": mean_tokens,
    }


def measure_memory_child(args) -> dict:
    """Child mode: ru_maxrss (KiB on Linux) before and after one full forward in this fresh process. The high-water
    mark is first reset to the current RSS (`/proc/self/clear_refs`) so a transient peak while building the model
    cannot hide the forward's."""
    model = build_model(args)
    pixels = make_pixels(args.measure_memory, model)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        model(pixels)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before_mib": before / 1024, "after_mib": after / 1024, "high_water_reset": reset}


def cuda_peak_memory(model: SetokModel, batch: int) -> dict:
    pixels = make_pixels(batch, model)
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    with torch.inference_mode():
        model(pixels)
    peak = torch.cuda.max_memory_allocated()
    method = "CUDA torch.cuda.max_memory_allocated minus memory allocated before the forward"
    return {"method": method, "peak_mib": (peak - baseline) / 2**20, "peak_total_mib": peak / 2**20}


def cpu_peak_memory(batch: int, args) -> dict:
    """Runs this script in `--measure-memory` mode. Call it while this process is small: an exec'ed child inherits
    its parent's peak RSS into its own ru_maxrss, which would otherwise hide the child's forward."""
    flags = f"--measure-memory {batch} --device {args.device} --dtype {args.dtype} --threads {torch.get_num_threads()}"
    command = [sys.executable, os.path.abspath(__file__), *flags.split()]
    child = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    reset = "high-water mark reset first" if child["high_water_reset"] else "high-water mark NOT reset"
    method = f"CPU peak-RSS increase of one forward, ru_maxrss after - before in a fresh child process ({reset})"
    return {
        "method": method,
        "peak_mib": child["after_mib"] - child["before_mib"],
        "peak_total_mib": child["after_mib"],
    }


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine_info(args, model: SetokModel | None) -> dict:
    on_cuda = args.device.startswith("cuda")
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if on_cuda else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "attn_implementation": None if model is None else model.config._attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15min_at_end": os.getloadavg(),  # other processes competing for the CPUs skew timings
    }


def markdown_report(results: list[dict], machine: dict) -> str:
    header = (
        "| batch | encoder s | full s | full - enc s | (full-enc)/enc | cluster s | merger s "
        "| (cluster+merger)/enc | images/s | peak mem MiB | mean tokens |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        rows.append(
            f"| {r['batch_size']} | {r['encoder_s']:.3f} | {r['full_s']:.3f} | {r['setok_s']:.3f} "
            f"| {r['setok_ratio']:.1%} | {r['cluster_s']:.4f} | {r['merger_s']:.3f} "
            f"| {r['cluster_merger_ratio']:.1%} | {r['images_per_s']:.3f} "
            f"| {r['peak_memory']['peak_mib']:.0f} | {r['mean_num_tokens']:.1f} |"
        )
    notes = [
        f"Machine: {machine['device_name']} ({machine['device']}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} threads), {machine['dtype']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}. Medians of {', '.join(str(r['repeats']) for r in results)} rounds.",
        f"Peak memory: {results[0]['peak_memory']['method']}.",
        "Mean tokens: random weights and random pixels, not meaningful for real images.",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def target_verdict(results: list[dict]) -> str:
    result = next((r for r in results if r["batch_size"] == TARGET_BATCH), None)
    if result is None:
        return f"Target not checked: batch {TARGET_BATCH} was not benchmarked."
    met = "MET" if result["setok_ratio"] <= TARGET_RATIO else "NOT MET"
    return (
        f"Target (full - encoder) / encoder <= {TARGET_RATIO:.0%} at batch {TARGET_BATCH}: {result['setok_ratio']:.1%} "
        f"-> {met}. Cross-check, cluster + merger timed alone: {result['cluster_merger_ratio']:.1%} of the encoder "
        "(the difference of two long timings carries their run-to-run noise)."
    )


# ---------------------------------------------------------------------------------------------------------------
# Token cluster alone: batched functions vs a plain per-image loop vs the bare distance matmul
# ---------------------------------------------------------------------------------------------------------------

CLUSTER_THRESHOLD = dict(k=64, threshold=0.5, fallback_num_clusters=64)
CLUSTER_ITERATIVE = dict(k=64, max_num_clusters=64, bandwidth_scale=0.1, stop_mass=0.05)


def cluster_features(args) -> torch.Tensor:
    """Seeded random features plus the 2D position embedding, as `SetokModel.cluster_patches` gets them."""
    grid, channels = args.cluster_grid, args.cluster_channels
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.cluster_batch, grid * grid, channels, generator=generator)
    return (features + sincos_position_embedding_2d(grid, grid, channels)).to(args.device)


def loop_scores(x: torch.Tensor, k: int):
    """One image `(N, C)`: distances `D` (one `torch.cdist`) and `rho * delta`, written the straightforward way."""
    n, channels = x.shape
    distances = torch.cdist(x, x).div_(math.sqrt(channels)).fill_diagonal_(0)
    rho = torch.exp(-distances.topk(min(k, n), dim=-1, largest=False).values.pow(2).mean(-1))
    index = torch.arange(n, device=x.device)
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (index[None, :] < index[:, None]))
    delta = distances.masked_fill(~denser, math.inf).amin(-1)
    delta = torch.where(torch.isinf(delta), distances.max(), delta)
    return distances, rho * delta


def loop_dpc(features, *, k, threshold, fallback_num_clusters, max_num_clusters=None):
    """`dpc_knn_cluster` as a per-image loop (spec 1.2; the cap is hard): the baseline the batched one must beat."""
    assignments, counts = [], []
    for x in features.float():
        distances, score = loop_scores(x, k)
        n = x.shape[0]
        cap = n if max_num_clusters is None else max_num_clusters
        rank = torch.empty(n, dtype=torch.long, device=x.device)
        rank[score.sort(descending=True, stable=True).indices] = torch.arange(n, device=x.device)
        passing = score > threshold
        centers = passing & (rank < cap) if passing.any() else rank < min(fallback_num_clusters, cap)
        center_index = centers.nonzero()[:, 0]
        labels = distances[:, center_index].argmin(-1)
        labels[center_index] = torch.arange(len(center_index), device=x.device)
        assignments.append(labels)
        counts.append(len(center_index))
    return torch.stack(assignments), torch.tensor(counts)


def loop_iterative(features, *, k, max_num_clusters, bandwidth_scale, stop_mass):
    """`iterative_cluster` (hard assignment) as a per-image loop, the same seeds, masks and numbering."""
    assignments, counts = [], []
    for x in features.float():
        distances, score = loop_scores(x, k)
        n = x.shape[0]
        bandwidth = max(bandwidth_scale * distances.pow(2).mean().item(), torch.finfo(torch.float32).tiny)
        cap = min(n, max_num_clusters)
        scope, masks, seeds = torch.ones(n, device=x.device), [], []
        for _ in range(cap):
            if scope.sum() < stop_mass * n:
                break
            seed = int((score * scope).argmax())
            claimed = scope * torch.exp(-distances[seed].pow(2) / bandwidth)
            scope = scope - claimed
            masks.append(claimed)
            seeds.append(seed)
        masks.append(scope if len(seeds) < cap else torch.zeros_like(scope))  # the leftover cluster, numbered last
        seeds.append(n)
        winner = torch.stack(masks).argmax(0)
        used = sorted(set(winner.tolist()), key=lambda cluster: seeds[cluster])
        label_of = torch.zeros(len(masks), dtype=torch.long)
        label_of[used] = torch.arange(len(used))
        assignments.append(label_of.to(x.device)[winner])
        counts.append(len(used))
    return torch.stack(assignments), torch.tensor(counts)


def load_reference(path: Path | None):
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("cluster_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cluster_variants(reference) -> dict:
    """Name -> function of the features. `matmul` is the floor: the `(B, N, N)` product every variant needs."""
    variants = {
        "matmul": lambda x: x @ x.mT,
        "threshold": lambda x: dpc_knn_cluster(x, **CLUSTER_THRESHOLD),
        "threshold-loop": lambda x: loop_dpc(x, **CLUSTER_THRESHOLD),
        "threshold-reference": lambda x: reference.dpc_knn_cluster(x, **CLUSTER_THRESHOLD),
        "iterative": lambda x: iterative_cluster(x, **CLUSTER_ITERATIVE),
        "iterative-loop": lambda x: loop_iterative(x, **CLUSTER_ITERATIVE),
        "iterative-reference": lambda x: reference.iterative_cluster(x, **CLUSTER_ITERATIVE),
    }
    return {name: fn for name, fn in variants.items() if reference is not None or not name.endswith("-reference")}


def measure_cluster_memory_child(args) -> dict:
    """Child mode: ru_maxrss increase of one call of one variant (after a small warm-up call, high-water reset)."""
    variant = cluster_variants(load_reference(args.cluster_reference))[args.measure_cluster_memory]
    variant(torch.randn(2, 16, 8))  # library start-up (thread pools, buffers) is not the variant's memory
    features = cluster_features(args)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        variant(features)
    return {"peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def cluster_peak_memory(args, names) -> dict:
    """Peak memory of one call per variant: CUDA in this process; CPU one fresh child each (call while small)."""
    if args.device.startswith("cuda"):
        features, variants, peaks = (
            cluster_features(args),
            cluster_variants(load_reference(args.cluster_reference)),
            {},
        )
        for name in names:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            with torch.inference_mode():
                variants[name](features)
            peaks[name] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        return peaks
    peaks = {}
    for name in names:
        flags = [
            "--measure-cluster-memory", name, "--device", args.device, "--threads", str(torch.get_num_threads()),
            "--cluster-batch", str(args.cluster_batch), "--cluster-grid", str(args.cluster_grid),
            "--cluster-channels", str(args.cluster_channels),
        ]  # fmt: skip
        if args.cluster_reference is not None:
            flags += ["--cluster-reference", str(args.cluster_reference)]
        command = [sys.executable, os.path.abspath(__file__), *flags]
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        peaks[name] = json.loads(result.stdout.splitlines()[-1])["peak_mib"]
    return peaks


def same_labels(a, b) -> int:
    """Images whose assignment and count agree exactly."""
    return sum(torch.equal(a[0][i].cpu(), b[0][i].cpu()) and int(a[1][i]) == int(b[1][i]) for i in range(len(a[1])))


def benchmark_clustering(args, peaks) -> dict:
    variants = cluster_variants(load_reference(args.cluster_reference))
    features = cluster_features(args)
    samples = {name: [] for name in variants}
    with torch.inference_mode():
        outputs = {name: fn(features) for name, fn in variants.items()}  # warm-up round, and the labels compared
        for round_index in range(args.cluster_repeats):
            for name, fn in variants.items():
                samples[name].append(timed(lambda fn=fn: fn(features), args.device))
            print(
                f"  cluster round {round_index + 1}/{args.cluster_repeats}: "
                + ", ".join(f"{name} {values[-1]:.3f} s" for name, values in samples.items()),
                flush=True,
            )
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    rows = {}
    for name in variants:
        if name == "matmul":
            continue
        method = name.split("-")[0]
        row = {
            "seconds": seconds[name],
            "loop_over_this": seconds[f"{method}-loop"] / seconds[name],
            "this_over_matmul": seconds[name] / seconds["matmul"],
            "peak_mib": peaks.get(name),
            "mean_num_clusters": outputs[name][1].float().mean().item(),
        }
        if name != method:  # the loop and the reference, compared with the batched function
            row["images_with_labels_equal_to_batched"] = same_labels(outputs[name], outputs[method])
        rows[name] = row
    return {
        "shape": [args.cluster_batch, args.cluster_grid**2, args.cluster_channels],
        "threshold_settings": CLUSTER_THRESHOLD,
        "iterative_settings": CLUSTER_ITERATIVE,
        "repeats": args.cluster_repeats,
        "matmul_s": seconds["matmul"],
        "matmul_peak_mib": peaks.get("matmul"),
        "samples_s": samples,
        "variants": rows,
    }


CLUSTER_LABELS = {
    "threshold": "`dpc_knn_cluster`, batched",
    "threshold-loop": "threshold, per-image loop",
    "threshold-reference": "threshold, `--cluster-reference`",
    "iterative": "`iterative_cluster`, batched",
    "iterative-loop": "iterative, per-image loop",
    "iterative-reference": "iterative, `--cluster-reference`",
}


def cluster_markdown(result: dict, machine: dict) -> str:
    batch, num_patches, channels = result["shape"]
    images = f"{batch} images"
    rows = [
        "| token cluster | median s | loop s / this s | this s / matmul s | peak mem MiB | mean clusters "
        "| labels = batched |",
        "|---|---|---|---|---|---|---|",
        f"| bare distance matmul `x @ x.mT` (floor) | {result['matmul_s']:.3f} | | 1.00 "
        f"| {_mib(result['matmul_peak_mib'])} | | |",
    ]
    for name, row in result["variants"].items():
        equal = row.get("images_with_labels_equal_to_batched")
        rows.append(
            f"| {CLUSTER_LABELS[name]} | {row['seconds']:.3f} | {row['loop_over_this']:.2f} "
            f"| {row['this_over_matmul']:.2f} | {_mib(row['peak_mib'])} | {row['mean_num_clusters']:.1f} "
            f"| {'' if equal is None else f'{equal}/{images}'} |"
        )
    notes = [
        f"B={batch} images, N={num_patches} patches, C={channels} (seeded random features plus the position "
        f"embedding), threshold variant {_settings(result['threshold_settings'])}, iterative variant "
        f"{_settings(result['iterative_settings'])}. Medians of {result['repeats']} interleaved rounds on "
        f"{machine['device_name']} ({machine['device']}, {machine['torch_threads']} threads), torch {machine['torch']}.",
        "Peak memory: "
        + (
            "torch.cuda.max_memory_allocated minus memory allocated before the call."
            if machine["device"].startswith("cuda")
            else "CPU peak-RSS increase of one call in a fresh child process (features already built)."
        ),
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def _mib(value) -> str:
    return "" if value is None else f"{value:.0f}"


def _settings(settings: dict) -> str:
    return ", ".join(f"`{key}={value}`" for key, value in settings.items())


def run_cluster_benchmark(args, peaks, machine) -> tuple[dict, str]:
    print(f"token cluster, {args.cluster_batch} x {args.cluster_grid**2} x {args.cluster_channels}", flush=True)
    result = benchmark_clustering(args, peaks)
    markdown = cluster_markdown(result, machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark_clustering.json").write_text(json.dumps({"machine": machine, **result}, indent=2))
    (args.out / "benchmark_clustering.md").write_text(markdown + "\n")
    return result, markdown


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory_child(args)))
        return
    if args.measure_cluster_memory:
        print(json.dumps(measure_cluster_memory_child(args)))
        return
    started = time.perf_counter()
    on_cuda = args.device.startswith("cuda")
    # CPU memory children first, while this process is small (see cpu_peak_memory).
    cluster_names = list(cluster_variants(load_reference(args.cluster_reference)))
    cluster_peaks = {} if on_cuda else cluster_peak_memory(args, cluster_names)
    if args.cluster_only:
        if on_cuda:
            cluster_peaks = cluster_peak_memory(args, cluster_names)
        machine = machine_info(args, None)
        _, markdown = run_cluster_benchmark(args, cluster_peaks, machine)
        print(
            f"\n{markdown}\n\nWrote {args.out / 'benchmark_clustering.json'} ({time.perf_counter() - started:.0f} s)"
        )
        return
    cpu_memory = {} if on_cuda else {batch: cpu_peak_memory(batch, args) for batch in args.batch_sizes}
    model = build_model(args)  # after the CPU memory children (see cpu_peak_memory)
    results = []
    for batch in args.batch_sizes:
        print(f"batch {batch} ({args.device}, {args.dtype}, {torch.get_num_threads()} threads)", flush=True)
        memory = cuda_peak_memory(model, batch) if on_cuda else cpu_memory[batch]
        results.append({**time_batch(model, batch, args), "peak_memory": memory})
    machine, verdict = machine_info(args, model), target_verdict(results)
    del model
    if on_cuda:
        cluster_peaks = cluster_peak_memory(args, cluster_names)
    cluster_result, cluster_table = run_cluster_benchmark(args, cluster_peaks, machine)
    markdown = f"{markdown_report(results, machine)}\n\n{verdict}\n\n{cluster_table}\n"
    report = {
        "machine": machine,
        "config": "SetokConfig() defaults (SigLIP so400m-patch14-384 geometry, 27x27 grid)",
        "results": results,
        "target": verdict,
        "clustering": cluster_result,
        "total_wall_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark_tokenizer.json").write_text(json.dumps(report, indent=2))
    (args.out / "benchmark_tokenizer.md").write_text(markdown)
    print(f"\n{markdown}\nWrote {args.out / 'benchmark_tokenizer.json'} ({report['total_wall_s']:.0f} s in total)")


if __name__ == "__main__":
    main()
