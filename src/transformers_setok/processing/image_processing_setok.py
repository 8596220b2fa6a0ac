"""Image processor of SeTok (PIL backend: works without torchvision).

Resize, rescale and normalise with the encoder's values (SigLIP: 384 x 384, mean = std = 0.5). Before that, every
input is brought to 8-bit RGB explicitly, so that grayscale, RGBA (composited on white), palette, 16-bit and float
images of any container (PIL, numpy, torch) come out the same way, and anything else is refused with a clear error.

Referring-segmentation masks go through the same geometry as their images (`masks=`, returned as `target_masks`):
see `SetokImageProcessor.preprocess`.
"""

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs

__all__ = ["InvalidMaskError", "SetokImageProcessor", "SetokImagesKwargs", "to_binary_mask"]


class SetokImagesKwargs(ImagesKwargs, total=False):
    """
    image_token_counts (`list[int]`, *optional*):
        SeTok token count of each image, in order (`len(f)` for `f` in `get_image_features(...).pooler_output`).
        Setokim's processor expands each image placeholder to that many image tokens; SeTok decides the count, so
        it is known only after the tokenizer has run. The image processor itself ignores it.
    """

    image_token_counts: list[int] | None


class SetokImageProcessor(PilBackend):
    r"""
    Constructs a SeTok image processor.

    Accepts a PIL image, a numpy array or a torch tensor (`(H, W)`, `(H, W, C)` or `(C, H, W)` with C in 1, 3, 4), or
    a list of them. Integer arrays are read at their bit depth (uint8: 0-255, uint16: 0-65535); float arrays must lie in
    [0, 1]. Returns `pixel_values` of shape `(B, 3, size, size)`.

    With `masks=` (one binary mask per image, `(H, W)` of its image's size: see `to_binary_mask`) it also returns
    `target_masks`, bool `(B, size, size)`: each mask transformed exactly as its image is (see `preprocess`).
    """

    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 384, "width": 384}
    default_to_square = True
    do_resize = True
    do_rescale = True
    do_normalize = True
    model_input_names = ["pixel_values"]
    valid_kwargs = SetokImagesKwargs

    @classmethod
    def from_encoder(cls, name_or_path: str, image_size: int) -> "SetokImageProcessor":
        """A SeTok processor with a pretrained encoder checkpoint's mean, std and resampling, resizing to its square
        input `image_size` (CLIP-style processors resize the shortest edge and crop, which would not give the square
        grid SeTok's position embedding expects)."""
        from transformers import AutoImageProcessor

        encoder_processor = AutoImageProcessor.from_pretrained(name_or_path).to_dict()
        keys = ("image_mean", "image_std", "resample", "rescale_factor")
        settings = {key: encoder_processor[key] for key in keys if key in encoder_processor}
        return cls(size={"height": image_size, "width": image_size}, **settings)

    def preprocess(self, images, masks=None, **kwargs):
        """`pixel_values` of `images`; with `masks` (one a image, in order), also `target_masks`.

        A mask goes through its image's geometry (resize, then centre crop, then padding, with the same settings
        and call-time overrides), so that it stays on its object: it is resized as an 8-bit 0/255 image with the
        image's own resampling filter (`resample`, bicubic by default) and thresholded at half (128 of 255), which
        makes a mask pixel on exactly where the resized image of the object drawn in white on black is nearer
        white than black. Padding adds background. Not nearest-neighbour: at SigLIP's 384 a nearest pick keeps or
        drops thin parts by where the sample points fall, while the filter weighs the whole footprint. A mask
        must be binary and non-empty; an object too small to cover half a pixel after downsizing leaves an empty
        target.
        """
        image_like = None if masks is None else {"masks": masks}
        return super().preprocess(images, image_like_kwargs=image_like, **kwargs)

    def _preprocess_image_like_inputs(self, images, masks=None, **kwargs):
        images = self._prepare_image_like_inputs(images, **kwargs)
        batch = self._preprocess(images, **kwargs)
        if masks is not None:
            targets = self._preprocess_masks(masks, images, **kwargs)
            batch.update(BatchFeature({"target_masks": targets}, tensor_type=kwargs.get("return_tensors")))
        return batch

    def _preprocess_masks(
        self, masks, images, do_resize, size, resample, do_center_crop, crop_size, do_pad, pad_size, **kwargs
    ) -> list[np.ndarray]:
        """`masks` through the geometry `_preprocess` applies to `images` (channels-first arrays): bool `(H, W)`."""
        masks = list(masks) if isinstance(masks, (list, tuple)) or (_is_array(masks) and masks.ndim == 3) else [masks]
        if len(masks) != len(images):
            raise ValueError(f"`masks` must hold one mask per image: {len(masks)} masks for {len(images)} images.")
        transformed = []
        for number, (mask, image) in enumerate(zip(masks, images)):
            try:
                mask = to_binary_mask(mask)
            except InvalidMaskError as error:
                raise ValueError(f"`masks[{number}]`: {error}") from error
            if mask.shape != image.shape[1:]:
                raise ValueError(
                    f"`masks[{number}]` is {mask.shape[0]} x {mask.shape[1]} (height x width), its image "
                    f"{image.shape[1]} x {image.shape[2]}: a mask must have its image's size."
                )
            if not mask.any():
                raise ValueError(f"`masks[{number}]` is empty: no pixel is on.")
            levels = mask[None].astype(np.uint8) * 255  # (1, H, W): what `resize` does to one image channel
            if do_resize:
                levels = self.resize(image=levels, size=size, resample=resample)
            if do_center_crop:
                levels = self.center_crop(levels, crop_size)
            transformed.append(levels >= 128)
        if do_pad:
            transformed = self.pad(transformed, pad_size=pad_size, fill_value=False)
        return [mask[0] for mask in transformed]

    def post_process_masks(self, mask_logits, original_sizes, threshold: float = 0.0) -> list[np.ndarray]:
        """Mask logits at the processed image's geometry -> bool masks at each original image's size.

        `mask_logits`: `(S, h, w)` (a tensor or array; any resolution of the processed square, e.g. the mask
        decoder's), `original_sizes`: S `(height, width)` pairs. The logits are resized bilinearly to each original
        size (undoing this processor's resize) and thresholded at `threshold` (0: probability one half). Only a plain
        resize can be undone: a processor that also crops or pads raises.
        """
        import torch
        import torch.nn.functional as F

        if getattr(self, "do_center_crop", None) or getattr(self, "do_pad", None):
            raise ValueError(
                "`post_process_masks` undoes a plain resize; this processor also crops or pads (do_center_crop / "
                "do_pad), whose lost borders cannot be restored."
            )
        logits = torch.as_tensor(np.asarray(mask_logits) if not _is_array(mask_logits) else mask_logits)
        if logits.ndim != 3:
            raise ValueError(f"`mask_logits` must be (S, h, w), got shape {tuple(logits.shape)}.")
        sizes = [tuple(size) for size in original_sizes]
        if len(sizes) != len(logits) or any(len(size) != 2 or min(size) < 1 for size in sizes):
            raise ValueError(
                f"`original_sizes` must hold one (height, width) pair of positive ints per mask: {len(logits)} masks, "
                f"got {sizes!r:.120}."
            )
        masks = []
        for logit, size in zip(logits.detach().float().cpu(), sizes):
            resized = F.interpolate(logit[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            masks.append((resized > threshold).numpy())
        return masks

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        # Every image is converted to RGB here (grayscale, alpha, palette, 16-bit), whatever `do_convert_rgb` says.
        rgb = to_rgb_uint8(image, input_data_format=input_data_format)
        return super().process_image(rgb, do_convert_rgb=False, input_data_format="channels_last")

    def postprocess(self, pixel_values) -> list[PIL.Image.Image]:
        """Pixels in this processor's normalisation (what SeTok's detokenizer outputs), `(B, 3, H, W)` or `(3, H, W)`
        -> RGB images."""
        pixels = np.asarray(pixel_values.detach().float().cpu() if _is_array(pixel_values) else pixel_values)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"`pixel_values` must be (B, 3, H, W) or (3, H, W), got shape {pixels.shape}.")
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        rgb = (np.clip(pixels * std + mean, 0, 1) * 255).round().astype(np.uint8)
        return [PIL.Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))) for image in rgb]

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        if images is None:
            raise ValueError("`images` is empty: pass at least one image.")
        if isinstance(images, (list, tuple)):
            images = [image for group in images for image in (group if isinstance(group, (list, tuple)) else [group])]
        elif _is_array(images) and images.ndim == 4:
            images = list(images)
        else:
            images = [images]
        if not images:
            raise ValueError("`images` is empty: pass at least one image.")
        return images


class InvalidMaskError(ValueError):
    """A mask that is not binary or not `(H, W)`: `reason` is the kind of problem, `detail` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason + (f": {detail}" if detail else ""))
        self.reason, self.detail = reason, detail


def to_binary_mask(mask) -> np.ndarray:
    """A binary mask (PIL image, numpy array or torch tensor, `(H, W)`) -> bool `(H, W)`.

    Values must be {0, 1} (bool, integers or floats) or {0, 255} (8-bit masks as PNGs save them); a palette image is
    read through its colours, and an RGB(A) image or `(H, W, 3 | 4)` array whose colour channels are all equal is
    read as grey (its alpha is not the mask). Anything else raises `InvalidMaskError`, saying what was found."""
    if isinstance(mask, PIL.Image.Image):
        if mask.mode in ("P", "PA", "LA"):
            mask = mask.convert("L")  # a palette image's indices are no values: its colours are
        elif mask.mode == "RGBA":
            mask = mask.convert("RGB")
        mask = np.asarray(mask)
    elif type(mask).__module__.startswith("torch") and hasattr(mask, "numpy"):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise InvalidMaskError("unknown mask form", f"expected a PIL image or an array, got a {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        if not (mask[..., :1] == mask[..., :3]).all():
            raise InvalidMaskError("bad mask values", "a colour image: a mask has one value per pixel")
        mask = mask[..., 0]
    if mask.ndim != 2 or 0 in mask.shape:
        raise InvalidMaskError("bad mask shape", f"expected (H, W), got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.copy()
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise InvalidMaskError("bad mask values", f"expected bool or numbers, got dtype {mask.dtype}")
    values = np.unique(mask)
    if np.isin(values, (0, 1)).all():
        return mask == 1
    if np.isin(values, (0, 255)).all():
        return mask == 255
    shown = ", ".join(f"{value:g}" for value in values[:8]) + (", ..." if len(values) > 8 else "")
    raise InvalidMaskError(
        "bad mask values", f"expected values in {{0, 1}} or {{0, 255}}, found {len(values)} distinct: {shown}"
    )


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def to_rgb_uint8(image, input_data_format: str | None = None) -> np.ndarray:
    """Any supported image -> `(H, W, 3)` uint8 RGB.

    The channel axis of arrays is guessed unless `input_data_format` (`"channels_first"`/`"channels_last"`) says it.
    """
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    if type(image).__module__.startswith("torch") and hasattr(image, "numpy"):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"`images` must be PIL images, numpy arrays or torch tensors, got {type(image).__name__}.")
    return _array_to_rgb(image, input_data_format=input_data_format)


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _array_to_rgb(np.asarray(image), sixteen_bit=True)
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray, sixteen_bit: bool | None = None, input_data_format=None) -> np.ndarray:
    """Arrays -> uint8 RGB. Integers are 16-bit when their dtype says so (uint16) or their values exceed 255."""
    layout = getattr(input_data_format, "value", input_data_format)
    if layout not in (None, "channels_first", "channels_last"):
        raise ValueError(f"`input_data_format` must be 'channels_first' or 'channels_last', got {layout!r}.")
    guessed_first = array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)
    if array.ndim == 3 and (layout == "channels_first" or (layout is None and guessed_first)):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(
            f"`images` arrays must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got shape {array.shape}."
        )
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("`images` contain NaN or infinite values.")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"float `images` must lie in [0, 1], got values in [{array.min():.3g}, {array.max():.3g}]."
            )
        array = np.round(array * 255)
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"`images` must be uint8, uint16 or float in [0, 1], got dtype {array.dtype}.")
    else:
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"integer `images` must lie in [0, 65535], got [{array.min()}, {array.max()}].")
        if sixteen_bit or array.dtype == np.uint16 or array.max() > 255:
            array = np.round(array.astype(np.float64) / 257)  # 65535 -> 255
    array = array.astype(np.uint8)
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float32) / 255
        array = np.round(array[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)
