"""Referring segmentation on Fashion-MNIST scenes, at smoke-test size (scripts/fashion_mnist_segmentation.py): scenes
of real images through `setok train` for all three stages, then the held-out evaluation with its baselines. IoU is
not checked against a level here (a few steps learn nothing); that the run goes through and that its numbers are the
ones its data imply is. Plus the pieces the report rests on: the captions, the expression kinds and the oracle
cluster pick."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml
from test_fashion_mnist_e2e import digits_as_idx

from transformers_setok.scenes import Scene, SceneItem
from transformers_setok.training.config import load_config
from transformers_setok.training.masks import decode_mask

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fashion_mnist_segmentation.py"
sys.path.insert(0, str(SCRIPT.parent))
import fashion_mnist_segmentation as segmentation  # noqa: E402


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "sft"])
def test_example_configs_are_valid(stage):
    # Their paths name the script's default work dir, which only exists after a run; everything else is checked.
    path = REPO / "examples" / "fashion_mnist_segmentation" / f"{stage}.yaml"
    config = load_config(path, stage, check_paths=False)
    assert config.training["use_cpu"] is True and config.training["dataloader_num_workers"] == 0


def test_captions_name_the_items_from_left_to_right():
    bag, sneaker, coat = (
        SceneItem("train", i, label, 0, left) for i, (label, left) in enumerate([(8, 60), (7, 0), (4, 30)])
    )
    assert segmentation.caption(Scene((bag, sneaker))) == "a sneaker and a bag"
    assert segmentation.caption(Scene((bag, sneaker, coat))) == "a sneaker, a coat and a bag"
    assert segmentation.expression_kind("the bag") == "class"
    assert segmentation.expression_kind("the item on the left") == "position"


def test_the_best_cluster_is_the_one_with_the_highest_iou_at_the_image_size():
    # A 2 x 2 grid of clusters on an 8 x 8 image; the object covers all of cluster 3 and a corner of cluster 1.
    labels = np.array([[0, 1], [2, 3]])
    reference = np.zeros((8, 8), dtype=bool)
    reference[4:, 4:] = True
    reference[2:4, 6:8] = True
    mask, count = segmentation.best_cluster(labels, reference)
    expected = np.zeros((8, 8), dtype=bool)
    expected[4:, 4:] = True  # IoU 16 / 20; cluster 1 scores 4 / 28
    assert count == 4 and np.array_equal(mask, expected)


def run_smoke(script: Path, tmp_path: Path, work: Path, sizes: list[str], table_row: str) -> dict:
    """Runs `script` (this one or the editing script) into `work` on the digits as idx files, at the smoke sizes
    `sizes`, every stage 2 steps of 4 and questions on half the train scenes. Checks that it printed the results
    table (its row `table_row`) and each stage's wall time, and that each stage ran its steps from a config `setok
    train` takes; returns the run's metrics.json."""
    command = [
        sys.executable,
        str(script),
        "--work-dir",
        str(work),
        "--data-dir",
        str(digits_as_idx(tmp_path / "idx")),
    ]
    command += [*sizes, "--batch-size", "4", "--qa-share", "0.5"]
    command += ["--tokenizer-steps", "2", "--pretrain-steps", "2", "--sft-steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert table_row in result.stdout
    metrics = json.loads((work / "metrics.json").read_text())
    for stage in ("tokenizer", "pretrain", "sft"):
        assert f"Stage {stage}: " in result.stdout
        row = metrics["stages"][stage]
        assert row["steps"] == 2 and row["batch_size"] == 4 and row["seconds"] > 0
        config = load_config(work / "configs" / f"{stage}.yaml", stage)
        assert Path(config.output_dir) == work / "runs" / stage
    return metrics


@pytest.mark.slow
def test_fashion_mnist_segmentation_smoke(tmp_path):
    work = tmp_path / "scenes"
    sizes = ["--train-scenes", "12", "--heldout-scenes", "4"]
    metrics = run_smoke(SCRIPT, tmp_path, work, sizes, "| **Setokim + mask decoder** (stage 3) |")
    counts = metrics["counts"]
    assert counts["train_scenes"] == 12 and counts["heldout_scenes"] == 4 and counts["qa_records"] == 6

    # The held-out samples are the held-out file's lines: t10k scenes, each mask its scene's non-black pixels' part.
    lines = [json.loads(line) for line in (work / "data" / "heldout_segmentation.jsonl").read_text().splitlines()]
    assert len(lines) == counts["heldout_expressions"] > 0
    assert all(line["image"].startswith("images/t10k-") for line in lines)
    masks = [decode_mask(line["mask"]) for line in lines]
    canvases = [np.asarray(PIL.Image.open(work / "data" / line["image"])) > 0 for line in lines]
    assert all((mask & ~canvas).sum() == 0 for mask, canvas in zip(masks, canvases))

    # The two reader-checkable baselines, recomputed here from the data alone.
    results = metrics["evaluation"]["results"]
    canvas_area = sum(mask.size for mask in masks)
    assert results["whole_canvas"]["all"]["ciou"] == pytest.approx(sum(mask.sum() for mask in masks) / canvas_area)
    items_iou = [mask.sum() / canvas.sum() for mask, canvas in zip(masks, canvases)]
    assert results["all_items"]["all"]["giou"] == pytest.approx(np.mean(items_iou))
    kinds = [segmentation.expression_kind(line["expression"]) for line in lines]
    for method in segmentation.METHODS:
        by_kind = results[method]
        assert by_kind["all"]["samples"] == len(lines)
        for kind in ("class", "position"):
            assert (by_kind[kind] or {"samples": 0})["samples"] == kinds.count(kind)
        assert 0.0 <= by_kind["all"]["ciou"] <= 1.0 and 0.0 <= by_kind["all"]["giou"] <= 1.0

    assert "last_mask_loss" in metrics["stages"]["sft"] and "last_concept_loss" in metrics["stages"]["tokenizer"]
    sft = yaml.safe_load((work / "configs" / "sft.yaml").read_text())
    assert sft["model"]["train_mask_decoder"] is True
    assert json.loads((work / "runs" / "sft" / "final" / "config.json").read_text())["use_mask_decoder"] is True

    overlays = PIL.Image.open(work / "overlays.png")
    shown = min(kinds.count("class"), 4) + min(kinds.count("position"), 4)
    assert overlays.size == (shown * 224, 28 + 3 * 224)
    assert (work / "report.md").read_text().count("| **Setokim + mask decoder** (stage 3) |") == 1


def test_the_referred_share_counts_only_the_predicted_pixels_on_items():
    items = np.zeros((4, 4), dtype=bool)
    items[0, :2] = items[3, :] = True  # two items: 2 and 4 pixels
    reference = np.zeros_like(items)
    reference[0, :2] = True
    prediction = np.zeros_like(items)
    prediction[0, 0] = prediction[3, 0] = prediction[1, 1] = (
        True  # one on it, one on the other item, one on background
    )
    assert segmentation.referred_share(prediction, reference, items) == 0.5
    assert segmentation.referred_share(items, reference, items) == 2 / 6  # every item: the referred item's share
    assert segmentation.referred_share(np.zeros_like(items), reference, items) == 0.0
    means = segmentation.mean_by_kind([1.0, 0.0, 0.5], ["class", "class", "position"])
    assert means == {"all": 0.5, "class": 0.5, "position": 0.5}
    assert segmentation.mean_by_kind([1.0], ["class"])["position"] is None
