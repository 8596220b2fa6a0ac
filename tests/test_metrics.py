"""The metrics the package ships as `evaluate` modules: they load from their local folders with the Hub off, and
cIoU / gIoU match hand-computed values."""

import os
import subprocess
import sys

import numpy as np
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


def test_loads_from_the_local_folder_with_the_hub_off(tmp_path):
    # A fresh process with the Hub and datasets offline and an empty modules cache: nothing cached helps it.
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path),
        HF_MODULES_CACHE=str(tmp_path / "m"),
    )
    code = (
        "from transformers_setok import metrics; "
        "print(metrics.load('referring_iou').compute(predictions=[[[1, 1]]], references=[[[0, 1]]])['ciou'])"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.5"
