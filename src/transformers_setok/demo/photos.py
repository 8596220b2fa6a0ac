"""Real photos that ship inside scikit-image, scikit-learn and matplotlib, and augmented crops of them."""

import numpy as np
import PIL.Image
import torch

from ..processing.image_processing_setok import to_rgb_uint8

# Loaders that work offline (some scikit-image loaders download on first use and are left out).
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "hubble_deep_field",
    "retina", "moon", "brick", "colorwheel", "logo", "clock", "page", "text",
)  # fmt: skip
HELD_OUT_PHOTOS = ("chelsea", "coffee", "grace_hopper", "flower")


def load_photos() -> dict[str, np.ndarray]:
    """Name -> image array, as the packages ship them (grayscale, RGBA and boolean images included)."""
    try:
        import matplotlib.cbook
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError(
            "The demo photos come from scikit-image, scikit-learn and matplotlib: "
            "pip install 'transformers-setok[demo]'."
        ) from error
    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    china, flower = load_sample_images().images
    photos.update(china=china, flower=flower)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos["grace_hopper"] = np.asarray(PIL.Image.open(handle).convert("RGB"))
    return photos


class AugmentedCrops(torch.utils.data.Dataset):
    """Random resized crops (25-100% of the area, aspect 3/4-4/3) with horizontal flips, processed for SeTok.

    Item `i` is drawn from a generator seeded with `(seed, i)`, so a run is reproducible whatever the data order.
    """

    def __init__(self, images: list[np.ndarray], processor, length: int, seed: int = 0):
        self.images = [PIL.Image.fromarray(to_rgb_uint8(image)) for image in images]
        self.processor = processor
        self.length = length
        self.seed = seed

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, index))
        image = self.images[rng.integers(len(self.images))]
        width, height = image.size
        area = rng.uniform(0.25, 1.0) * width * height
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        left, top = rng.integers(width - crop_w + 1), rng.integers(height - crop_h + 1)
        crop = image.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            crop = crop.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return {"pixel_values": self.processor(crop, return_tensors="pt")["pixel_values"][0]}
