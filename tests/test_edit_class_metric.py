"""The `edit_class_accuracy` metric the package ships: an edit is correct when the class found in its edited region
(or -1, empty) equals the class it wants there (or -1, a removal); hand-computed shares, batches, bad ids, and the
module loads from its folder with the Hub off."""

import pytest
from test_metrics import run_offline

from transformers_setok import metrics


@pytest.fixture(scope="module")
def edit_class_accuracy():
    return metrics.load("edit_class_accuracy")


def test_shares_against_hand_computed_values(edit_class_accuracy):
    # Removals (wanted -1): found empty (right), found a 4 (wrong). Classes: 3 for 3 (right), 2 for 7 (wrong), empty
    # where a 5 was wanted (wrong: an addition that added nothing).
    result = edit_class_accuracy.compute(predictions=[-1, 4, 3, 7, -1], references=[-1, -1, 3, 2, 5])
    assert result == {
        "accuracy": 2 / 5,
        "removal_accuracy": 1 / 2,
        "class_accuracy": 1 / 3,
        "num_removals": 2,
        "num_classes": 3,
        "per_sample_correct": [True, False, True, False, False],
    }


def test_a_share_over_no_edits_is_none(edit_class_accuracy):
    only_classes = edit_class_accuracy.compute(predictions=[1, 1], references=[1, 0])
    assert only_classes["removal_accuracy"] is None and only_classes["num_removals"] == 0
    assert only_classes["class_accuracy"] == only_classes["accuracy"] == 0.5
    only_removals = edit_class_accuracy.compute(predictions=[-1], references=[-1])
    assert only_removals["class_accuracy"] is None and only_removals["removal_accuracy"] == 1.0


def test_batches_add_up_to_one_compute(edit_class_accuracy):
    predictions, references = [-1, 0, 9, 2, -1, 5], [-1, 0, 8, -1, 3, 5]
    for start in (0, 3):
        edit_class_accuracy.add_batch(
            predictions=predictions[start : start + 3], references=references[start : start + 3]
        )
    assert edit_class_accuracy.compute() == edit_class_accuracy.compute(predictions=predictions, references=references)


@pytest.mark.parametrize(
    "predictions, references, named",
    [
        ([2.5], [2], r"predictions\[0\] is 2.5: expected a class id"),
        ([0, 1], [0, -2], r"references\[1\] is -2.0: expected a class id .* or -1"),
        ([float("nan")], [0], r"predictions\[0\] is nan"),
    ],
)
def test_bad_ids_are_refused_by_name(edit_class_accuracy, predictions, references, named):
    with pytest.raises(ValueError, match=named):
        edit_class_accuracy.compute(predictions=predictions, references=references)


def test_no_samples_is_an_error(edit_class_accuracy):
    with pytest.raises(ValueError, match="No samples"):
        edit_class_accuracy.compute(predictions=[], references=[])


def test_edit_class_accuracy_loads_with_the_hub_off(tmp_path):
    code = (
        "from transformers_setok import metrics; "
        "print(metrics.load('edit_class_accuracy').compute(predictions=[-1, 3], references=[-1, 2])['accuracy'])"
    )
    assert run_offline(code, tmp_path) == "0.5"
