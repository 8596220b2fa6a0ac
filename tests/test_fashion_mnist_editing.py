"""Image editing and guided text-to-image on Fashion-MNIST scenes, at smoke-test size
(scripts/fashion_mnist_editing.py): scenes and their edits of real images through `setok train` for all three stages,
then the held-out evaluation with its baselines. Quality is not checked here (a few steps learn nothing); that the
run goes through and that its baseline numbers are the ones its data imply is. Plus the pieces the scores rest on:
the captions, the emptiness rule of a region and the box a drawn item is looked for in."""

import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml
from test_fashion_mnist_segmentation import run_smoke

from transformers_setok.scenes import Scene, SceneItem
from transformers_setok.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fashion_mnist_editing.py"
sys.path.insert(0, str(SCRIPT.parent))
import fashion_mnist_editing as editing  # noqa: E402


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "sft"])
def test_example_configs_are_valid(stage):
    # Their paths name the script's default work dir, which only exists after a run; everything else is checked.
    config = load_config(REPO / "examples" / "fashion_mnist_editing" / f"{stage}.yaml", stage, check_paths=False)
    assert config.training["use_cpu"] is True and config.training["dataloader_num_workers"] == 0
    if stage != "tokenizer":  # guidance needs condition dropout where the head trains
        assert config.model.train_generation_head is True and config.model.condition_text_dropout > 0


def test_captions_use_the_instructions_phrases_from_left_to_right():
    trousers, sneaker, boot = (
        SceneItem("train", i, label, 0, left) for i, (label, left) in enumerate([(1, 60), (7, 0), (9, 30)])
    )
    assert editing.caption(Scene((trousers, sneaker))) == "a sneaker and a pair of trousers"
    assert editing.caption(Scene((trousers, sneaker, boot))) == "a sneaker, an ankle boot and a pair of trousers"
    assert editing.caption(Scene((boot,))) == "an ankle boot"


class Fixed:
    """A classifier that names every crop `label`."""

    def __init__(self, label):
        self.label = label

    def predict(self, features):
        return np.full(len(features), self.label)


def test_a_region_below_the_empty_level_is_empty_else_classified():
    image = np.zeros((56, 56), dtype=np.uint8)
    image[0:28, 0:28] = 9  # mean 9: not empty at level 8
    image[28:56, 28:56] = 7  # mean 7: empty at level 8
    picture = PIL.Image.fromarray(image)
    boxes = [(0, 0, 28, 28), (28, 28, 56, 56), (0, 28, 28, 56)]
    assert editing.region_labels(Fixed(3), [picture] * 3, boxes, 8.0, (56, 56)) == [3, editing.EMPTY, editing.EMPTY]


def test_the_item_box_is_centred_on_the_item():
    image = np.zeros((112, 112), dtype=np.uint8)
    image[50:70, 61:75] = 200  # centre of mass (59.5, 67.5): the box starts at 59.5 - 13.5 = 46, 67.5 - 13.5 = 54
    image[5, 5] = 10  # at the threshold: not the item's
    assert editing.item_box(image) == (46, 54, 74, 82)
    image[100:112, 100:112] = 255  # the centre of mass near the corner: the box stays inside the image
    corner = np.zeros((112, 112), dtype=np.uint8)
    corner[104:112, 104:112] = 255
    assert editing.item_box(corner) == (84, 84, 112, 112)
    assert editing.item_box(np.zeros((28, 28), dtype=np.uint8)) == (0, 0, 28, 28)


def test_guidance_pairs_are_parsed_or_refused():
    assert editing.guidance_pair("2,1.5") == (2.0, 1.5)
    with pytest.raises(Exception, match="expected TEXT,IMAGE guidance scales"):
        editing.guidance_pair("2")


@pytest.mark.slow
def test_fashion_mnist_editing_smoke(tmp_path):
    work = tmp_path / "editing"
    sizes = ["--train-scenes", "12", "--train-singles", "6", "--heldout-scenes", "4", "--heldout-singles", "5"]
    sizes += ["--classifier-train", "400"]
    sizes += ["--edit-guidance", "1,1", "2,1.5", "--t2i-guidance", "1", "3", "--drawn-per-class", "1"]
    sizes += ["--sampling-steps", "2", "--unmasking-rounds", "2"]
    metrics = run_smoke(SCRIPT, tmp_path, work, sizes, "| **Setokim edit**, guidance text 2, image 1.5 |")
    counts, evaluation = metrics["counts"], metrics["evaluation"]
    assert counts["train_scenes"] == 12 and counts["heldout_scenes"] == 4 and counts["qa_records"] == 6

    # The held-out edits are the held-out file's lines: t10k scenes, the kinds counted as the file has them.
    lines = [json.loads(line) for line in (work / "data" / "heldout_edits.jsonl").read_text().splitlines()]
    assert len(lines) == counts["heldout_edits"]["all"] > 0
    assert all(
        line["source"].startswith("images/t10k-") and line["target"].startswith("images/t10k-") for line in lines
    )
    kinds = [line["kind"] for line in lines]
    for kind in ("remove", "replace", "add"):
        assert counts["heldout_edits"][kind] == kinds.count(kind)
    assert all((line["wanted"] == editing.EMPTY) == (line["kind"] == "remove") for line in lines)

    def pixels(name):
        return np.asarray(PIL.Image.open(work / "data" / name).convert("L"), dtype=np.float64) / 255

    # "Source unchanged", recomputed here from the data alone: MagicBrush's L1 / L2 of source against target (grey
    # images: the three RGB channels are equal), the mean over edits; an addition's box is empty in its source, so
    # no addition is correct; a removal's box is empty in its target, so every removal of the target is correct.
    differences = [pixels(line["source"]) - pixels(line["target"]) for line in lines]
    unchanged, target = evaluation["editing"]["source_unchanged"], evaluation["editing"]["target"]
    assert unchanged["all"]["l1"] == pytest.approx(np.mean([np.abs(d).mean() for d in differences]))
    assert unchanged["all"]["l2"] == pytest.approx(np.mean([np.square(d).mean() for d in differences]))
    for line in (line for line in lines if line["kind"] != "replace"):
        top, left, bottom, right = line["box"]
        empty_in = pixels(line["source" if line["kind"] == "add" else "target"])[top:bottom, left:right]
        assert not empty_in.any()
    if unchanged["add"] is not None:
        assert unchanged["add"]["class_accuracy"] == 0.0
    if target["remove"] is not None:
        assert target["remove"]["class_accuracy"] == 1.0
    assert target["all"]["l1"] == target["all"]["l2"] == 0.0

    rows = {"model_1.0_1.0", "model_2.0_1.5", "source_unchanged", "target_through_setok", "target"}
    assert set(evaluation["editing"]) == rows
    for scores in evaluation["editing"].values():
        assert scores["all"]["samples"] == len(lines)
        assert 0.0 <= scores["all"]["class_accuracy"] <= 1.0 and 0.0 <= scores["all"]["l1"] <= 1.0

    t2i = evaluation["text_to_image"]
    assert set(t2i["per_scale"]) == {"1.0", "3.0"} and all(0.0 <= v <= 1.0 for v in t2i["per_scale"].values())
    assert 0.0 <= metrics["classifier"]["t10k_accuracy"] <= 1.0 and metrics["classifier"]["empty_level"] > 0

    assert "last_diffusion_loss" in metrics["stages"]["sft"] and "last_diffusion_loss" in metrics["stages"]["pretrain"]
    sft = yaml.safe_load((work / "configs" / "sft.yaml").read_text())
    assert sft["data"]["editing"]["path"] == str(work / "data" / "stage3_edits.jsonl")
    assert json.loads((work / "runs" / "sft" / "final" / "config.json").read_text())["use_generation_head"] is True

    shown = min(kinds.count("remove"), 2) + min(kinds.count("replace"), 2) + min(kinds.count("add"), 2)
    # instruction, source, 2 outputs, target via SeTok, target
    assert PIL.Image.open(work / "edits.png").size == (6 * 224, 20 + shown * 224)
    assert (work / "report.md").read_text().count("| baseline: the source returned unchanged |") == 1
