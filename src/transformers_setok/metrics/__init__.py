"""The evaluation metrics the package ships as `evaluate` modules, loaded from their folders here (a metric script
on the Hub cannot be fetched offline).

    >>> from transformers_setok import metrics
    >>> metrics.load("referring_iou").compute(predictions=masks, references=reference_masks)  # cIoU, gIoU

Each metric is a folder `<name>/` holding `<name>.py` (what `evaluate.load(<folder>)` reads); the folders are package
data, not packages.
"""

from pathlib import Path

__all__ = ["METRICS", "load", "metric_path"]

_HERE = Path(__file__).resolve().parent
METRICS = ("referring_iou", "editing_distance", "edit_class_accuracy")


def metric_path(name: str) -> str:
    """The folder of shipped metric `name`, which `evaluate.load` reads."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}: the package ships {list(METRICS)}.")
    return str(_HERE / name)


def load(name: str, **kwargs):
    """`evaluate.load` of shipped metric `name` from its local folder (`kwargs` go to `evaluate.load`)."""
    try:
        import evaluate
    except ImportError as error:
        raise ImportError("The metrics need `evaluate`: pip install 'transformers-setok[training]'.") from error
    return evaluate.load(metric_path(name), **kwargs)
