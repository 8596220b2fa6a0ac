"""Edit class accuracy: does the edited region of an edited image hold what the instruction asked for?

An `evaluate` metric module, loaded from its folder (`transformers_setok.metrics.load("edit_class_accuracy")`, which
is `evaluate.load(<this folder>)`); nothing is fetched from the Hub. It is self-contained on purpose: `evaluate`
copies this file into its modules cache and imports it from there, so it cannot import its package.

What it scores is decided by the caller, who looks at each edited image's edited region (the box an item was removed
from, replaced in or added to) and writes down one id per edit:

* a prediction is the class id a classifier gives the region's contents, or `EMPTY` (-1) when the caller's emptiness
  rule finds nothing there (the rule is the caller's: a classifier trained on objects has no "nothing" class);
* a reference is the class id the edit wants there ("replace the bag with a sneaker", "add a sneaker on the right":
  the sneaker's id), or `EMPTY` when it wants the region cleared ("remove the bag").

An edit is correct when its prediction equals its reference: a removal exactly when its region was found empty, a
replacement or an addition exactly when its region holds an object of the wanted class (an empty region is wrong for
them, as any other class is). The accuracy is the share of correct edits; `removal_accuracy` and `class_accuracy`
are the same share over the edits that want the region empty and over those that want a class.
"""

import datasets
import evaluate
import numpy as np

EMPTY = -1

_DESCRIPTION = """
The share of edits whose edited region holds what the edit asked for: per edit, the class id found in the region (or
-1 when the region is empty) against the class id wanted there (or -1 for a removal, which wants it empty); an edit is
correct when the two are equal.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): per edit, the class id found in the edited region of the edited image, or -1 when the
        region is empty.
    references (`list[int]`): per edit, the class id the edit wants in that region, or -1 when it wants the region
        empty (a removal).
Returns:
    accuracy (`float`): the share of edits with prediction == reference.
    removal_accuracy (`float` or None): that share over the edits with reference -1 (None when there are none): the
        share of removals that left the region empty.
    class_accuracy (`float` or None): that share over the edits with a class reference (None when there are none).
    num_removals (`int`), num_classes (`int`): how many edits each of the two shares is over.
    per_sample_correct (`list[bool]`): each edit's, in order.
Examples:
    >>> metric = transformers_setok.metrics.load("edit_class_accuracy")
    >>> result = metric.compute(predictions=[-1, 3, 7, -1], references=[-1, 3, 2, 5])
    >>> result["accuracy"], result["removal_accuracy"], result["class_accuracy"]  # a removal done, 1 class of 3
    (0.5, 1.0, 0.3333333333333333)
"""

_CITATION = ""

# Stored as floats and checked to be whole numbers >= -1 in `_compute`: an int64 feature would let pyarrow truncate
# a 2.7 to 2, or fail with its own message, instead of naming the sample.
_IDS = datasets.Value("float64")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EditClassAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _IDS, "references": _IDS}),
        )

    def _compute(self, predictions, references):
        predicted = _ids(predictions, "predictions")
        wanted = _ids(references, "references")
        if not len(wanted):
            raise ValueError("No samples: pass at least one prediction and reference.")
        correct = predicted == wanted
        removals = wanted == EMPTY
        return {
            "accuracy": float(correct.mean()),
            "removal_accuracy": _share(correct[removals]),
            "class_accuracy": _share(correct[~removals]),
            "num_removals": int(removals.sum()),
            "num_classes": int((~removals).sum()),
            "per_sample_correct": [bool(value) for value in correct],
        }


def _ids(values, name: str) -> np.ndarray:
    ids = np.asarray(values, dtype=np.float64)
    for number, value in enumerate(ids):
        if not np.isfinite(value) or value != np.floor(value) or value < EMPTY:
            raise ValueError(
                f"{name}[{number}] is {float(value)!r}: expected a class id (an integer >= 0) or {EMPTY} (the region is, or "
                "should be, empty)."
            )
    return ids.astype(np.int64)


def _share(correct: np.ndarray) -> float | None:
    return float(correct.mean()) if len(correct) else None
