"""The metrics the package ships as `evaluate` modules: they load from their local folders with the Hub off, and
cIoU / gIoU and MagicBrush's editing L1 / L2 match hand-computed values."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from transformers_setok import metrics


@pytest.fixture(scope="module")
def referring_iou():
    return metrics.load("referring_iou")


def box(shape, rows, columns) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, columns] = True
    return mask


def test_ciou_and_giou_against_hand_computed_values(referring_iou):
    # Sample 1 (4 x 4): prediction rows 0..1 (8 px), reference rows 0..3 of column 0..1 (8 px): intersection 4
    # (rows 0..1, columns 0..1), union 12 -> IoU 1/3.
    # Sample 2 (2 x 3): prediction = reference = 2 px -> intersection 2, union 2 -> IoU 1.
    predictions = [box((4, 4), slice(0, 2), slice(None)), box((2, 3), 0, slice(0, 2))]
    references = [box((4, 4), slice(None), slice(0, 2)), box((2, 3), 0, slice(0, 2))]
    result = referring_iou.compute(predictions=predictions, references=references)
    assert result["ciou"] == pytest.approx((4 + 2) / (12 + 2))  # 3/7: the big sample weighs more
    assert result["giou"] == pytest.approx((1 / 3 + 1) / 2)  # 2/3
    assert result["per_sample_iou"] == pytest.approx([1 / 3, 1.0])


def test_lists_and_0_1_integers_are_accepted(referring_iou):
    result = referring_iou.compute(predictions=[[[1, 1], [0, 0]]], references=[[[1, 0], [0, 0]]])
    assert result == {"ciou": 0.5, "giou": 0.5, "per_sample_iou": [0.5]}


def test_empty_prediction(referring_iou):
    reference = box((3, 3), 1, slice(None))
    result = referring_iou.compute(predictions=[np.zeros((3, 3), bool)], references=[reference])
    assert result["ciou"] == 0.0 and result["giou"] == 0.0
    # Empty against empty: nothing to find and nothing found, IoU 1; it adds nothing to cIoU's sums.
    both_empty = referring_iou.compute(
        predictions=[np.zeros((3, 3), bool), reference], references=[np.zeros((3, 3), bool), reference]
    )
    assert both_empty["per_sample_iou"] == [1.0, 1.0] and both_empty["ciou"] == 1.0


def test_batches_add_up_to_one_compute(referring_iou):
    rng = np.random.default_rng(0)
    predictions = [rng.random((5, 6)) < 0.5 for _ in range(6)]
    references = [rng.random((5, 6)) < 0.5 for _ in range(6)]
    for start in (0, 3):
        referring_iou.add_batch(predictions=predictions[start : start + 3], references=references[start : start + 3])
    assert referring_iou.compute() == referring_iou.compute(predictions=predictions, references=references)


def test_mismatched_shapes_are_refused(referring_iou):
    with pytest.raises(ValueError, match=r"predictions\[1\] has shape \(2, 3\), references\[1\] \(3, 2\)"):
        referring_iou.compute(
            predictions=[np.ones((2, 2), bool), np.ones((2, 3), bool)],
            references=[np.ones((2, 2), bool), np.ones((3, 2), bool)],
        )


def test_non_binary_masks_are_refused(referring_iou):
    with pytest.raises(ValueError, match=r"references\[0\] must be binary .*255"):
        referring_iou.compute(predictions=[[[1, 0]]], references=[[[255, 0]]])


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="Unknown metric 'cider'.*referring_iou"):
        metrics.load("cider")


def run_offline(code: str, tmp_path) -> str:
    """`code` run in a fresh process with the Hub and datasets offline and an empty modules cache (nothing cached
    helps it); its stdout."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path),
        HF_MODULES_CACHE=str(tmp_path / "m"),
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_loads_from_the_local_folder_with_the_hub_off(tmp_path):
    code = (
        "from transformers_setok import metrics; "
        "print(metrics.load('referring_iou').compute(predictions=[[[1, 1]]], references=[[[0, 1]]])['ciou'])"
    )
    assert run_offline(code, tmp_path) == "0.5"


# --- MagicBrush's L1 / L2 (editing_distance) ---

EDITING_DISTANCE = str(Path(metrics.__file__).parent / "editing_distance")


@pytest.fixture(scope="module")
def editing_distance():
    import evaluate

    return evaluate.load(EDITING_DISTANCE)


def grey(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.uint8)


def test_l1_l2_against_hand_computed_values(editing_distance):
    # Sample 1 (1 x 2 grey): output [0, 51] against target [0, 255]: differences 0 and 204/255 = 0.8 per channel,
    # so L1 = 0.8 / 2 = 0.4 and L2 = 0.64 / 2 = 0.32.
    # Sample 2 (1 x 1): a grey 0 output against a pure red target: channel differences 1, 0, 0 -> L1 = L2 = 1/3.
    red = np.zeros((1, 1, 3), dtype=np.uint8)
    red[..., 0] = 255
    result = editing_distance.compute(predictions=[grey([0, 51]), grey([0])], references=[grey([0, 255]), red])
    assert result["per_sample_l1"] == pytest.approx([0.4, 1 / 3])
    assert result["per_sample_l2"] == pytest.approx([0.32, 1 / 3])
    assert result["l1"] == pytest.approx((0.4 + 1 / 3) / 2) and result["l2"] == pytest.approx((0.32 + 1 / 3) / 2)


def test_every_pair_weighs_the_same(editing_distance):
    # A 1-pixel pair at distance 1 and a 100-pixel pair at distance 0: the mean over pairs is 0.5 (a mean over
    # pixels would give 1/101).
    result = editing_distance.compute(
        predictions=[grey([255]), np.zeros((10, 10), np.uint8)], references=[grey([0]), np.zeros((10, 10), np.uint8)]
    )
    assert result["l1"] == pytest.approx(0.5) and result["l2"] == pytest.approx(0.5)


def test_identical_images_are_at_distance_zero(editing_distance, photos):
    photo = PIL.Image.fromarray(photos["chelsea"]).resize((60, 40))
    result = editing_distance.compute(predictions=[photo, photos["rocket"]], references=[photo, photos["rocket"]])
    assert result == {"l1": 0.0, "l2": 0.0, "per_sample_l1": [0.0, 0.0], "per_sample_l2": [0.0, 0.0]}


def test_the_output_is_resized_to_the_target(editing_distance, photos):
    # A flat image stays flat under any resize: a 2 x 2 output of 51 against a 4 x 4 target of 0 is at 0.2 / 0.04.
    flat = editing_distance.compute(
        predictions=[np.full((2, 2), 51, np.uint8)], references=[np.zeros((4, 4), np.uint8)]
    )
    assert flat["l1"] == pytest.approx(0.2) and flat["l2"] == pytest.approx(0.04)
    # A photo: the output (not the target) is brought to the target's size, with PIL's bicubic filter.
    output, target = PIL.Image.fromarray(photos["astronaut"]), PIL.Image.fromarray(photos["coffee"]).resize((90, 70))
    resized = np.asarray(output.resize(target.size, PIL.Image.Resampling.BICUBIC), dtype=np.float64) / 255
    difference = resized - np.asarray(target, dtype=np.float64) / 255
    result = editing_distance.compute(predictions=[output], references=[target])
    assert result["l1"] == pytest.approx(np.abs(difference).mean(), abs=1e-12)
    assert result["l2"] == pytest.approx(np.square(difference).mean(), abs=1e-12)
    swapped = editing_distance.compute(predictions=[target], references=[output])
    assert swapped["l1"] != pytest.approx(result["l1"])  # which image is resized matters


def test_editing_distance_bad_inputs(editing_distance):
    with pytest.raises(ValueError, match="No samples"):
        editing_distance.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match=r"predictions\[0\] is an image of mode 'F': pass 8-bit images"):
        editing_distance.compute(predictions=[np.full((2, 2), 0.5, np.float32)], references=[grey([0])])


def test_editing_distance_loads_with_the_hub_off(tmp_path):
    code = (
        "import evaluate, numpy as np; "
        f"metric = evaluate.load({EDITING_DISTANCE!r}); "
        "print(metric.compute(predictions=[np.full((3, 3), 255, np.uint8)], references=[np.zeros((1, 1), np.uint8)]))"
    )
    assert run_offline(code, tmp_path) == "{'l1': 1.0, 'l2': 1.0, 'per_sample_l1': [1.0], 'per_sample_l2': [1.0]}"
