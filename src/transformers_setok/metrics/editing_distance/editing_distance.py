"""Image-editing distance, MagicBrush's L1 and L2 between an edited (output) image and its target.

An `evaluate` metric module, loaded from its folder (`evaluate.load(<this folder>)`, as
`transformers_setok.metrics` loads its metrics); nothing is fetched from the Hub. It is self-contained on purpose:
`evaluate` copies this file into its modules cache and imports it from there, so it cannot import its package.

The definition is MagicBrush's evaluation script, `eval_distance` in `evaluation/image_eval.py` of
https://github.com/OSU-NLP-Group/MagicBrush (Zhang et al., NeurIPS 2023 Datasets and Benchmarks), read and
re-implemented here with numpy:

1. both images are converted to RGB by PIL (`Image.convert("RGB")`: a grey image gets three equal channels, an
   alpha channel is dropped, not composited);
2. the output is resized to the target's size with PIL's bicubic filter (the script calls `resize(gt.size)`, whose
   default filter for RGB images is bicubic); the target is never resized;
3. both are scaled to [0, 1] (`torchvision`'s `ToTensor`: value / 255);
4. a pair's L1 is the mean absolute difference over all 3 x H x W values (`torch.nn.L1Loss`), its L2 the mean
   squared difference (`torch.nn.MSELoss`: squared, no square root);
5. the reported L1 / L2 is the plain mean over pairs (every pair weighs the same, whatever its size).

Papers quote these either on this [0, 1] scale (MagicBrush's tables) or multiplied by 100 (0.063 read as 6.3).
"""

import datasets
import evaluate
import numpy as np
import PIL.Image

_DESCRIPTION = """
MagicBrush's L1 and L2 distances between edited images and their targets: each output is converted to RGB, resized
to its target's size (bicubic), both are scaled to [0, 1], and a pair's L1 (L2) is the mean absolute (squared)
difference over its pixels and channels; the results are the means over pairs.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of images): the edited images, PIL images or uint8 arrays `(H, W)` / `(H, W, 3 | 4)`, any
        size (each is resized to its reference's).
    references (`list` of images): the target images, the same forms.
Returns:
    l1 (`float`): the mean over pairs of each pair's mean absolute difference, in [0, 1].
    l2 (`float`): the mean over pairs of each pair's mean squared difference, in [0, 1].
    per_sample_l1 (`list[float]`), per_sample_l2 (`list[float]`): each pair's, in order.
Examples:
    >>> metric = evaluate.load("<transformers_setok>/metrics/editing_distance")
    >>> result = metric.compute(predictions=[np.full((2, 2), 51, np.uint8)], references=[np.zeros((4, 4), np.uint8)])
    >>> round(result["l1"], 6), round(result["l2"], 6)  # 51 / 255 and its square: a flat image stays flat
    (0.2, 0.04)
"""

_CITATION = """
@inproceedings{zhang2023magicbrush,
  title={MagicBrush: A Manually Annotated Dataset for Instruction-Guided Image Editing},
  author={Zhang, Kai and Mo, Lingbo and Chen, Wenhu and Sun, Huan and Su, Yu},
  booktitle={Advances in Neural Information Processing Systems (Datasets and Benchmarks Track)},
  year={2023}
}
"""

# 8-bit modes only: "value / 255" is the [0, 1] scale of 8-bit images; PIL's RGB conversion clips 16-bit and float
# images ("I;16", "I", "F") to 0..255 instead of scaling them, which would give wrong distances without a word.
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EditingDistance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=["https://github.com/OSU-NLP-Group/MagicBrush/blob/main/evaluation/image_eval.py"],
        )

    def _compute(self, predictions, references):
        l1, l2 = [], []
        for number, (prediction, reference) in enumerate(zip(predictions, references)):
            target = _rgb(reference, f"references[{number}]")
            output = _rgb(prediction, f"predictions[{number}]")
            if output.size != target.size:
                output = output.resize(target.size, PIL.Image.Resampling.BICUBIC)
            difference = _unit(output) - _unit(target)
            l1.append(float(np.abs(difference).mean()))
            l2.append(float(np.square(difference).mean()))
        if not l1:
            raise ValueError("No samples: pass at least one prediction and reference.")
        return {"l1": float(np.mean(l1)), "l2": float(np.mean(l2)), "per_sample_l1": l1, "per_sample_l2": l2}


def _rgb(image, name: str) -> PIL.Image.Image:
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"{name} must be an image (a PIL image or a uint8 array), got a {type(image).__name__}.")
    if image.mode not in _EIGHT_BIT_MODES:
        raise ValueError(
            f"{name} is an image of mode {image.mode!r}: pass 8-bit images (PIL images, or uint8 arrays), which the [0, 1] "
            "scale (value / 255) is defined on."
        )
    return image.convert("RGB")


def _unit(image: PIL.Image.Image) -> np.ndarray:
    """`(H, W, 3)` float64 in [0, 1]."""
    return np.asarray(image, dtype=np.float64) / 255.0
