"""Referring-segmentation IoU, the two numbers RefCOCO reports: cIoU and gIoU.

An `evaluate` metric module, loaded from its folder (`transformers_setok.metrics.load("referring_iou")`, which is
`evaluate.load(<this folder>)`); nothing is fetched from the Hub. It is self-contained on purpose: `evaluate` copies
this file into its modules cache and imports it from there, so it cannot import its package relatively.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Intersection over union of predicted and reference binary masks, one pair per referring expression:

* cIoU (cumulative IoU) = sum over samples of |prediction AND reference| / sum over samples of
  |prediction OR reference|: big objects weigh more.
* gIoU (generalised, mean IoU) = the mean over samples of each sample's |P AND R| / |P OR R|; a sample whose
  prediction and reference are both empty counts as IoU 1 (nothing to find, nothing found).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-d arrays): predicted masks, `(H, W)` each, bool or 0/1.
    references (`list` of 2-d arrays): reference masks, `(H, W)` each, the size of their prediction.
Returns:
    ciou (`float`): cumulative intersection over cumulative union.
    giou (`float`): mean per-sample IoU.
    per_sample_iou (`list[float]`): each sample's IoU, in order.
Examples:
    >>> metric = transformers_setok.metrics.load("referring_iou")
    >>> metric.compute(predictions=[[[1, 1], [0, 0]]], references=[[[1, 0], [0, 0]]])
    {'ciou': 0.5, 'giou': 0.5, 'per_sample_iou': [0.5]}
"""

_CITATION = """
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C. and Berg, Tamara L.},
  booktitle={ECCV},
  year={2016}
}
"""

# Stored as numbers, checked to be 0/1 in `_compute`: a bool feature would turn any non-zero value (a probability,
# a 255) into True without a word.
_MASK = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferringIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _MASK, "references": _MASK}),
        )

    def _compute(self, predictions, references):
        intersections, unions = [], []
        for number, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction = _binary(prediction, f"predictions[{number}]")
            reference = _binary(reference, f"references[{number}]")
            if prediction.shape != reference.shape:
                raise ValueError(
                    f"predictions[{number}] has shape {prediction.shape}, references[{number}] {reference.shape}: "
                    "a prediction must be the size of its reference mask."
                )
            intersections.append(int(np.logical_and(prediction, reference).sum()))
            unions.append(int(np.logical_or(prediction, reference).sum()))
        if not unions:
            raise ValueError("No samples: pass at least one prediction and reference.")
        ious = [intersection / union if union else 1.0 for intersection, union in zip(intersections, unions)]
        total_union = sum(unions)
        return {
            "ciou": sum(intersections) / total_union if total_union else 1.0,
            "giou": float(np.mean(ious)),
            "per_sample_iou": ious,
        }


def _binary(mask, name: str) -> np.ndarray:
    array = np.asarray(mask, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d mask (H, W), got shape {array.shape}.")
    if not np.isin(array, (0.0, 1.0)).all():
        found = np.unique(array[~np.isin(array, (0.0, 1.0))])[:5]
        raise ValueError(f"{name} must be binary (bool or 0/1), found values such as {found.tolist()}.")
    return array == 1
