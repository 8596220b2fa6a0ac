"""Benchmark the prompts' KV cache in Setokim's unmasking rounds: the drawing pipelines with and without it.

With `reuse_prefix_cache` (the default) a pipeline reads the columns before the images' slots (the chat, an edit's
source block, `[Img]`) once, into a KV cache (`model.image_token_prefix_cache`), and each unmasking round runs the LLM
on the slots only; without it every round re-reads the whole rows. This script draws the same images both ways in one
process and prints the wall-time ratio cached / uncached, for a text-to-image draw and an editing draw, both guided
(the batched conditional and null rows share one cache: 2 variants for text-to-image, 3 for InstructPix2Pix editing).

- Model: a moderately sized random Setokim (a Llama of `--hidden-size` x `--layers`, a small SeTok on 64 x 64 images,
  a word-level tokenizer; random weights from `--seed`). The prompt is a long description, as real prompts are; the
  edits' sources are real photos (`demo/photos.py`), which SeTok splits into 10-20 tokens.
- Token counts: each draw's count is fixed (`--tokens`, one per prompt) instead of sampled from the random LLM, so
  both ways draw the same number of tokens in the same rounds; the one touch of pipeline internals is
  `fixed_counts_and_timed_rounds` below, which also times the unmasking rounds alone.
- Timing: `--repeats` rounds in ABBA order (cached, uncached, uncached, cached, ...), so that load drift on a shared
  machine hits both alike; medians of the whole call and of its unmasking rounds are reported. The first call of each
  way is an untimed warm-up and the guard: both ways must draw the same tokens (up to float rounding).

On a small CPU shared with other jobs, pass `--threads 1` (see scripts/benchmark_setokim.py).

    python scripts/benchmark_sampling_cache.py --threads 1
    python scripts/benchmark_sampling_cache.py --threads 1 --hidden-size 256 --layers 4 --repeats 1   # quicker
"""

import argparse
import json
import statistics
import time

import PIL.Image
import torch
from benchmark_tokenizer import machine_info
from fashion_mnist_e2e import word_tokenizer

from transformers_setok import (
    SetokConfig,
    SetokImageProcessor,
    SetokimConfig,
    SetokimForConditionalGeneration,
    SetokimProcessor,
)
from transformers_setok.demo.photos import HELD_OUT_PHOTOS, load_photos
from transformers_setok.generation import noise_scheduler_for
from transformers_setok.pipelines import SetokimImageEditingPipeline, SetokimTextToImagePipeline

PROMPT = (
    "a quiet harbour town at dawn with small wooden boats resting on calm water , red and white houses along the "
    "shore , a stone lighthouse on the rocks to the left , gulls over the masts , soft orange light on the clouds "
    "and long reflections on the water , painted in the style of an old travel poster with clean lines and flat "
    "colours , a narrow street climbing the hill behind the houses and a church tower at its top"
)
INSTRUCTION = (
    "replace the sky with a stormy evening sky full of dark clouds and make the water darker , keep the boats the "
    "houses and the lighthouse as they are and add warm lights in the windows"
)
TOLERANCE = 1e-4  # cached vs uncached tokens: the same sums in another order (the tests assert the tight bound)


def build(args) -> tuple[SetokimForConditionalGeneration, SetokimProcessor]:
    tokenizer = word_tokenizer([PROMPT, INSTRUCTION])
    processor = SetokimProcessor(image_processor=SetokImageProcessor(size=64), tokenizer=tokenizer)
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    )
    setok = SetokConfig(
        vision_config=vision,
        merger_hidden_size=128,
        merger_num_attention_heads=4,
        merger_intermediate_size=256,
        token_dim=64,
        detokenizer_hidden_size=128,
        detokenizer_num_attention_heads=4,
        detokenizer_intermediate_size=256,
        detokenizer_num_query_layers=1,
        detokenizer_num_decoder_layers=1,
        cluster_k=8,
        cluster_threshold=0.4,
        cluster_fallback_num_clusters=16,
        max_num_clusters=64,
    )
    text = dict(
        model_type="llama",
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64,
        vocab_size=len(processor.tokenizer),
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    config = SetokimConfig(
        vision_config=setok,
        text_config=text,
        image_token_id=processor.image_token_id,
        boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
        use_generation_head=True,
        generation_head_width=256,
        generation_head_depth=3,
    )
    torch.manual_seed(args.seed)
    model = SetokimForConditionalGeneration(config).eval()
    for parameter in model.generation_head.parameters():  # a fresh head predicts zero: give it something to draw
        torch.nn.init.normal_(parameter, std=0.05)
    return model, processor


def fixed_counts_and_timed_rounds(pipe, counts: list[int]) -> list[float]:
    """Makes `pipe` draw `counts` tokens per image (instead of sampling the count from the random LLM) and returns the
    list that collects the seconds of each call's unmasking rounds. Pipeline internals: `_image_lengths` (step 1)
    and `_draw_tokens` (step 2)."""
    seconds = []
    draw = pipe._draw_tokens

    def timed_draw(*args, **kwargs):
        start = time.perf_counter()
        tokens = draw(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return tokens

    pipe._image_lengths = lambda inputs, *rest: torch.tensor(counts, device=inputs["input_ids"].device)
    pipe._draw_tokens = timed_draw
    return seconds


def measure(name: str, pipe, call, counts: list[int], repeats: int) -> dict:
    rounds = fixed_counts_and_timed_rounds(pipe, counts)
    runs = {True: [], False: []}

    def once(reuse: bool):
        pipe.reuse_prefix_cache = reuse
        start = time.perf_counter()
        out = call(pipe)
        whole = time.perf_counter() - start
        return out, whole, rounds[-1]

    (cached, *_), (uncached, *_) = once(True), once(False)  # warm-up and guard
    difference = max(float((a - b).abs().max()) for a, b in zip(cached.image_tokens, uncached.image_tokens))
    if [len(t) for t in cached.image_tokens] != counts or difference > TOLERANCE:
        raise SystemExit(f"{name}: cached and uncached draws differ (max |diff| {difference:.2e})")
    for index in range(repeats):
        order = (True, False) if index % 2 == 0 else (False, True)
        for reuse in order:
            runs[reuse].append(once(reuse)[1:])
    median = {reuse: [statistics.median(column) for column in zip(*timings)] for reuse, timings in runs.items()}
    return {
        "draw": name,
        "tokens_per_image": counts,
        "max_abs_token_difference": difference,
        "cached_s": median[True][0],
        "uncached_s": median[False][0],
        "ratio_cached_over_uncached": median[True][0] / median[False][0],
        "rounds_cached_s": median[True][1],
        "rounds_uncached_s": median[False][1],
        "rounds_ratio_cached_over_uncached": median[True][1] / median[False][1],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=512, help="the Llama's width (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=8, help="the Llama's layers")
    parser.add_argument("--tokens", default="32,24", help="comma-separated token counts, one image per count")
    parser.add_argument("--rounds", type=int, default=8, help="unmasking rounds")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per way (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the draws")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device, args.dtype = "cpu", "float32"

    model, processor = build(args)
    counts = [int(count) for count in args.tokens.split(",")]
    options = dict(num_unmasking_rounds=args.rounds, num_inference_steps=args.steps, max_image_tokens=max(counts))
    photos = load_photos()
    sources = [PIL.Image.fromarray(photos[HELD_OUT_PHOTOS[i % len(HELD_OUT_PHOTOS)]]) for i in range(len(counts))]

    def pipeline(cls):
        pipe = cls(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generator():
        return torch.Generator().manual_seed(args.seed)

    def draw_text_to_image(pipe):
        return pipe([PROMPT] * len(counts), guidance_scale=3.0, generator=generator(), output_type="pt", **options)

    def draw_edit(pipe):
        return pipe(
            image=sources,
            prompt=INSTRUCTION,
            guidance_scale=3.0,
            image_guidance_scale=1.5,
            generator=generator(),
            output_type="pt",
            **options,
        )

    with torch.no_grad():
        prompt_tokens = len(processor.tokenizer(PROMPT)["input_ids"])
        pixels = processor.image_processor(sources, return_tensors="pt")["pixel_values"]
        source_tokens = [len(t) for t in model.get_image_features(pixels).pooler_output]
    results = [
        measure(
            "text-to-image, guidance 3.0",
            pipeline(SetokimTextToImagePipeline),
            draw_text_to_image,
            counts,
            args.repeats,
        ),
        measure(
            "editing, guidance 3.0 / image 1.5", pipeline(SetokimImageEditingPipeline), draw_edit, counts, args.repeats
        ),
    ]
    setting = {
        "llm": f"llama {args.hidden_size} x {args.layers} layers",
        "prompt_words": prompt_tokens,
        "edit_source_tokens": source_tokens,
        "unmasking_rounds": args.rounds,
        "denoising_steps": args.steps,
        "repeats": args.repeats,
    }
    print(json.dumps({"machine": machine_info(args, model), "setting": setting}, indent=1))
    print()
    print(
        "| draw | tokens | cached s | uncached s | cached/uncached | rounds: cached s | uncached s | cached/uncached |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['draw']} | {r['tokens_per_image']} | {r['cached_s']:.3f} | {r['uncached_s']:.3f} "
            f"| {r['ratio_cached_over_uncached']:.2f} | {r['rounds_cached_s']:.3f} | {r['rounds_uncached_s']:.3f} "
            f"| {r['rounds_ratio_cached_over_uncached']:.2f} |"
        )
    print(
        f"\nmax |cached - uncached| over the drawn tokens: {max(r['max_abs_token_difference'] for r in results):.1e}"
    )


if __name__ == "__main__":
    main()
