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

    python scripts/benchmark_tokenizer.py                          # batch 1 and 8, float32, cuda if available
    python scripts/benchmark_tokenizer.py --device cpu --threads 2 --batch-sizes 1 --repeats 5
"""

import argparse
import json
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

from transformers_setok import SetokConfig, SetokModel

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


def machine_info(args, model: SetokModel) -> dict:
    on_cuda = args.device.startswith("cuda")
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if on_cuda else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "attn_implementation": model.config._attn_implementation,
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


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory_child(args)))
        return
    started = time.perf_counter()
    on_cuda = args.device.startswith("cuda")
    cpu_memory = {} if on_cuda else {batch: cpu_peak_memory(batch, args) for batch in args.batch_sizes}
    model = build_model(args)  # after the CPU memory children (see cpu_peak_memory)
    results = []
    for batch in args.batch_sizes:
        print(f"batch {batch} ({args.device}, {args.dtype}, {torch.get_num_threads()} threads)", flush=True)
        memory = cuda_peak_memory(model, batch) if on_cuda else cpu_memory[batch]
        results.append({**time_batch(model, batch, args), "peak_memory": memory})
    machine, verdict = machine_info(args, model), target_verdict(results)
    markdown = f"{markdown_report(results, machine)}\n\n{verdict}\n"
    report = {
        "machine": machine,
        "config": "SetokConfig() defaults (SigLIP so400m-patch14-384 geometry, 27x27 grid)",
        "results": results,
        "target": verdict,
        "total_wall_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark_tokenizer.json").write_text(json.dumps(report, indent=2))
    (args.out / "benchmark_tokenizer.md").write_text(markdown)
    print(f"\n{markdown}\nWrote {args.out / 'benchmark_tokenizer.json'} ({report['total_wall_s']:.0f} s in total)")


if __name__ == "__main__":
    main()
