"""SetokImageProcessor (PIL backend): every input kind is brought to 8-bit RGB the same way, bad input is refused."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from transformers_setok import SetokImageProcessor, SetokModel

SIZE = 32  # small output keeps every test fast; the default size is checked separately


@pytest.fixture(scope="module")
def processor():
    return SetokImageProcessor(size={"height": SIZE, "width": SIZE})


def pixels(processor, images, **kwargs):
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


def level(count=1):
    """`count` 8-bit levels in output units (mean = std = 0.5: the output spans 2 over 255 levels)."""
    return count * 2 / 255 + 1e-6


@pytest.fixture(scope="module")
def rgb():
    """A smooth but non-trivial 24 x 40 RGB uint8 image (gradients in every channel)."""
    rows, cols = np.mgrid[0:24, 0:40]
    image = np.stack([rows * 10, cols * 6, (rows * cols) % 256], axis=-1)
    return image.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Output shape and normalisation
# ---------------------------------------------------------------------------------------------------------------


def test_default_output_shape_and_values():
    processor = SetokImageProcessor()
    assert processor.size == {"height": 384, "width": 384}
    white = pixels(processor, PIL.Image.new("RGB", (50, 30), (255, 255, 255)))
    black = pixels(processor, PIL.Image.new("RGB", (50, 30), (0, 0, 0)))
    assert white.shape == black.shape == (1, 3, 384, 384)
    assert white.dtype == torch.float32
    assert torch.equal(white, torch.ones_like(white))
    assert torch.equal(black, -torch.ones_like(black))


def test_uniform_colour_is_normalised_per_channel(processor):
    image = PIL.Image.new("RGB", (17, 9), (255, 0, 51))
    out = pixels(processor, image)[0]
    assert torch.allclose(out[0], torch.tensor(1.0)) and torch.allclose(out[1], torch.tensor(-1.0))
    assert torch.allclose(out[2], torch.tensor(51 / 255 * 2 - 1), atol=1e-6)


def test_custom_mean_std_and_call_time_size(rgb):
    processor = SetokImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.0, 0.0, 0.0], image_std=[1, 1, 1])
    out = pixels(processor, np.full((5, 5, 3), 255, np.uint8))
    assert out.shape == (1, 3, 16, 16) and torch.allclose(out, torch.ones_like(out))
    assert pixels(processor, rgb, size={"height": 8, "width": 12}).shape == (1, 3, 8, 12)


def test_pixel_content_follows_the_image(processor, rgb):
    # Not just a constant: a left-to-right gradient must stay a left-to-right gradient.
    out = pixels(processor, rgb)[0]
    assert out[1, :, -1].mean() > out[1, :, 0].mean() + 1  # green grows along the columns
    assert out[0, -1, :].mean() > out[0, 0, :].mean() + 1  # red grows along the rows


def test_one_by_one_image(processor):
    out = pixels(processor, np.array([[[255, 0, 128]]], dtype=np.uint8))
    assert out.shape == (1, 3, SIZE, SIZE)
    assert torch.allclose(out[0, 0], torch.tensor(1.0)) and torch.allclose(out[0, 1], torch.tensor(-1.0))
    assert torch.allclose(out[0, 2], torch.tensor(128 / 255 * 2 - 1), atol=1e-6)
    assert pixels(processor, PIL.Image.new("L", (1, 1), 0)).eq(-1).all()


def test_huge_image():
    huge = PIL.Image.new("RGB", (4000, 3000), (10, 200, 30))
    out = pixels(SetokImageProcessor(), huge)
    assert out.shape == (1, 3, 384, 384)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([10, 200, 30]) / 255 * 2 - 1, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Input kinds: all must agree with the plain uint8 RGB result
# ---------------------------------------------------------------------------------------------------------------


def test_pil_rgb_equals_numpy_hwc(processor, rgb):
    assert torch.equal(pixels(processor, PIL.Image.fromarray(rgb)), pixels(processor, rgb))


def test_numpy_chw_equals_hwc(processor, rgb):
    assert torch.equal(pixels(processor, np.ascontiguousarray(rgb.transpose(2, 0, 1))), pixels(processor, rgb))


def test_grayscale_inputs_are_replicated_to_three_channels(processor, rgb):
    gray = rgb[..., 0]
    expected = pixels(processor, np.repeat(gray[..., None], 3, axis=-1))
    assert torch.equal(pixels(processor, PIL.Image.fromarray(gray)), expected)  # mode "L"
    assert torch.equal(pixels(processor, gray), expected)  # (H, W)
    assert torch.equal(pixels(processor, gray[..., None]), expected)  # (H, W, 1)
    assert torch.equal(pixels(processor, gray[None]), expected)  # (1, H, W)
    out = expected[0]
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_rgba_is_composited_on_white(processor):
    image = np.zeros((6, 8, 4), np.uint8)
    image[..., 0] = 200  # red everywhere
    image[:3, :, 3] = 255  # top half opaque
    image[3:, :, 3] = 0  # bottom half fully transparent
    for candidate in (PIL.Image.fromarray(image, mode="RGBA"), image, np.ascontiguousarray(image.transpose(2, 0, 1))):
        out = pixels(SetokImageProcessor(size={"height": 6, "width": 8}, do_resize=False), candidate)[0]
        assert torch.allclose(out[:, :3], (torch.tensor([200, 0, 0]) / 255 * 2 - 1)[:, None, None], atol=1e-6)
        assert torch.equal(out[:, 3:], torch.ones(3, 3, 8))  # transparent -> white, not black


def test_half_transparent_black_is_mid_grey_in_every_container(processor):
    image = np.zeros((4, 4, 4), np.uint8)
    image[..., 3] = 128
    from_pil = pixels(processor, PIL.Image.fromarray(image, mode="RGBA"))
    from_numpy = pixels(processor, image)
    from_torch = pixels(processor, torch.from_numpy(image))
    assert (from_pil - from_numpy).abs().max() <= level()
    assert torch.equal(from_numpy, from_torch)
    assert from_pil.abs().max() < 0.02  # 127 or 128 of 255


def test_la_image_is_composited_on_white(processor):
    gray_alpha = np.zeros((4, 4, 2), np.uint8)  # black, fully transparent
    out = pixels(processor, PIL.Image.fromarray(gray_alpha, mode="LA"))
    assert torch.equal(out, torch.ones_like(out))


def test_palette_image(processor, rgb):
    palette = PIL.Image.fromarray(rgb).convert("P")
    assert palette.mode == "P"
    assert torch.equal(pixels(processor, palette), pixels(processor, np.asarray(palette.convert("RGB"))))


def test_palette_transparency_becomes_white(processor):
    image = PIL.Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 2))  # top half: index 1 (red), bottom half: index 0 (black)
    image.info["transparency"] = 0
    out = pixels(SetokImageProcessor(size={"height": 4, "width": 4}, do_resize=False), image)[0]
    assert torch.equal(out[:, :2], (torch.tensor([1.0, -1.0, -1.0]))[:, None, None].expand(3, 2, 4))
    assert torch.equal(out[:, 2:], torch.ones(3, 2, 4))


def test_sixteen_bit_images(processor, rgb):
    full = np.full((5, 7), 65535, np.uint16)
    half = np.full((5, 7), 32768, np.uint16)
    white8 = pixels(processor, np.full((5, 7), 255, np.uint8))
    for image in (PIL.Image.fromarray(full), full):
        if isinstance(image, PIL.Image.Image):
            assert image.mode == "I;16"
        assert torch.equal(pixels(processor, image), white8)
    for image in (PIL.Image.fromarray(half), half):
        out = pixels(processor, image)
        assert out.abs().max() <= level()  # mid-grey, not white (clipped) or near black (>> 8 read as 8 bit)
    # A 16-bit version of an 8-bit image (v * 257) is the same image.
    gray = rgb[..., 1]
    wide = gray.astype(np.uint16) * 257
    expected = pixels(processor, gray)
    assert torch.equal(pixels(processor, wide), expected)
    assert torch.equal(pixels(processor, PIL.Image.fromarray(wide)), expected)
    wide_rgb = rgb.astype(np.uint16) * 257
    assert torch.equal(pixels(processor, wide_rgb), pixels(processor, rgb))


def test_sixteen_bit_dark_values_are_not_read_as_eight_bit(processor):
    # 255 in a uint16 array is 255 / 65535 of full scale: black, not white.
    out = pixels(processor, np.full((4, 4), 255, np.uint16))
    assert torch.allclose(out, torch.full_like(out, -1.0), atol=level())


def test_float_arrays_match_uint8(processor, rgb):
    expected = pixels(processor, rgb)
    as_float = rgb.astype(np.float32) / 255
    assert (pixels(processor, as_float) - expected).abs().max() <= level()
    assert (pixels(processor, as_float.astype(np.float64)) - expected).abs().max() <= level()
    assert (pixels(processor, np.ascontiguousarray(as_float.transpose(2, 0, 1))) - expected).abs().max() <= level()
    # Arbitrary floats land within one 8-bit level of their rounded uint8 version.
    noise = np.random.default_rng(0).random((24, 40, 3))
    diff = pixels(processor, noise) - pixels(processor, np.round(noise * 255).astype(np.uint8))
    assert diff.abs().max() <= level()
    # and the boundaries are inclusive
    assert pixels(processor, np.ones((3, 3), np.float32)).eq(1).all()
    assert pixels(processor, np.zeros((3, 3), np.float32)).eq(-1).all()


def test_torch_tensors(processor, rgb):
    expected = pixels(processor, rgb)
    chw_uint8 = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    assert torch.equal(pixels(processor, chw_uint8), expected)
    assert torch.equal(pixels(processor, torch.from_numpy(rgb)), expected)  # HWC uint8
    chw_float = chw_uint8.float() / 255
    assert (pixels(processor, chw_float) - expected).abs().max() <= level()
    assert (pixels(processor, chw_float.requires_grad_()) - expected).abs().max() <= level()
    assert (pixels(processor, chw_float.detach().to(torch.bfloat16)) - expected).abs().max() <= level(2)


def test_single_image_list_and_batch(processor, rgb, photos):
    images = [rgb, photos["chelsea"], PIL.Image.fromarray(photos["coffee"]), torch.from_numpy(photos["rocket"])]
    batch = pixels(processor, images)
    assert batch.shape == (4, 3, SIZE, SIZE)
    for i, image in enumerate(images):
        assert torch.equal(batch[i : i + 1], pixels(processor, image))
    assert not torch.equal(batch[0], batch[1])
    assert pixels(processor, (rgb, rgb)).shape == (2, 3, SIZE, SIZE)  # tuples too


def test_four_dimensional_batches(processor, rgb):
    other = rgb[::-1, ::-1].copy()
    expected = torch.cat([pixels(processor, rgb), pixels(processor, other)])
    hwc = np.stack([rgb, other])
    assert torch.equal(pixels(processor, hwc), expected)
    chw = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    assert torch.equal(pixels(processor, chw), expected)
    assert (pixels(processor, torch.from_numpy(chw).float() / 255) - expected).abs().max() <= level()


def test_real_photos(processor, photos):
    for name, photo in photos.items():
        out = pixels(processor, photo)
        assert out.shape == (1, 3, SIZE, SIZE), name
        assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6 and out.std() > 0.1, name


def test_input_is_not_modified(processor, rgb):
    image = np.zeros((4, 4, 4), np.uint8)
    image[..., 3] = 100
    before = image.copy()
    pixels(processor, image)
    assert np.array_equal(image, before)
    floats = rgb.astype(np.float32) / 255
    before = floats.copy()
    pixels(processor, floats)
    assert np.array_equal(floats, before)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, error",
    [
        ("photo.png", TypeError),
        (None, ValueError),
        ([], ValueError),
        ((), ValueError),
        (["photo.png"], TypeError),
        (42, TypeError),
        ({"pixel_values": np.zeros((3, 4, 4))}, TypeError),
        (np.full((4, 5, 3), np.nan, np.float32), ValueError),
        (np.full((4, 5, 3), np.inf, np.float32), ValueError),
        (np.full((4, 5, 3), 1.5, np.float32), ValueError),
        (np.full((4, 5, 3), -0.1, np.float64), ValueError),
        (torch.full((3, 4, 5), 2.0), ValueError),
        (np.full((4, 5, 3), -1, np.int32), ValueError),
        (torch.full((3, 4, 5), -7, dtype=torch.int16), ValueError),
        (np.full((4, 5, 3), 70000, np.int64), ValueError),
        (np.zeros((10, 12, 5), np.uint8), ValueError),
        (np.zeros((5, 10, 12), np.uint8), ValueError),
        (np.zeros((2, 10, 12, 5), np.uint8), ValueError),
        (np.zeros((2, 2, 10, 12), np.uint8), ValueError),
        (torch.zeros(2, 5, 10, 12), ValueError),
        (np.zeros((1, 2, 10, 12, 3), np.uint8), ValueError),
        (np.zeros((0, 12, 3), np.uint8), ValueError),
        (np.zeros(12, np.uint8), ValueError),
        (np.zeros((4, 5, 3), np.complex64), ValueError),
        ([np.zeros((4, 5, 3), np.uint8), "photo.png"], TypeError),
    ],
)
def test_rejects_bad_input(processor, images, error):
    with pytest.raises(error, match="`images`"):
        processor(images, return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------------
# Serialisation and the Auto API
# ---------------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, rgb):
    processor = SetokImageProcessor(
        size={"height": 24, "width": 24}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]
    )
    processor.save_pretrained(tmp_path)
    loaded = SetokImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SetokImageProcessor
    assert loaded.size == {"height": 24, "width": 24}
    assert list(loaded.image_mean) == [0.1, 0.2, 0.3] and list(loaded.image_std) == [0.4, 0.5, 0.6]
    assert torch.equal(pixels(loaded, rgb), pixels(processor, rgb))
    assert pixels(loaded, rgb).shape == (1, 3, 24, 24)


def test_auto_image_processor_resolves_the_saved_folder(tmp_path, config, rgb):
    SetokModel(config).save_pretrained(tmp_path)
    processor = SetokImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SetokImageProcessor)
    assert loaded.size == {"height": 32, "width": 32}
    assert torch.equal(pixels(loaded, rgb), pixels(processor, rgb))


def test_channel_layout_hint_is_honoured_for_tiny_images():
    red = torch.zeros(3, 1, 1)
    red[0] = 1
    out = SetokImageProcessor(size=4)(red, input_data_format="channels_first", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_empty_batch_tensor_is_rejected():
    with pytest.raises(ValueError, match="`images` is empty"):
        SetokImageProcessor(size=8)(torch.zeros(0, 3, 8, 8))


# --- Masks (referring segmentation) go through their image's geometry ---


def square_scene(height=100, width=80, top=21, left=13, bottom=67, right=51):
    """A red square on black, and its mask: (image (H, W, 3) uint8, mask (H, W) bool)."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[top:bottom, left:right, 0] = 255
    return image, image[..., 0] == 255


@pytest.mark.parametrize(
    "settings",
    [
        {"size": {"height": 37, "width": 37}},  # downsized, aspect changed
        {"size": {"height": 160, "width": 140}},  # upsized
        {"size": {"shortest_edge": 45}, "do_center_crop": True, "crop_size": {"height": 40, "width": 40}},
        {"size": {"height": 37, "width": 37}, "resample": 0},  # nearest
    ],
)
def test_mask_stays_on_its_object(settings):
    # The mask's pixels are on exactly where the processed red channel is nearer red than black (0 once normalised).
    processor = SetokImageProcessor(**settings)
    image, mask = square_scene()
    out = processor(image, masks=mask, return_tensors="pt")
    assert out["target_masks"].dtype == torch.bool
    assert out["target_masks"].shape == (1, *out["pixel_values"].shape[-2:])
    assert torch.equal(out["target_masks"][0], out["pixel_values"][0, 0] > 0)
    assert 0 < out["target_masks"].sum() < out["target_masks"].numel()


def test_masks_of_a_batch_are_padded_like_their_images():
    processor = SetokImageProcessor(do_resize=False, do_pad=True)
    (big, big_mask), (small, small_mask) = square_scene(), square_scene(60, 50, 5, 5, 30, 30)
    out = processor([big, small], masks=[big_mask, PIL.Image.fromarray(small_mask)], return_tensors="pt")
    assert out["target_masks"].shape == (2, 100, 80)
    assert torch.equal(out["target_masks"], out["pixel_values"][:, 0] > 0)
    assert not out["target_masks"][1, 60:].any() and not out["target_masks"][1, :, 50:].any()


def test_real_shape_on_a_real_photo_stays_aligned():
    from skimage import data

    horse = ~data.horse()  # (328, 400), the horse True
    photo = np.asarray(PIL.Image.fromarray(data.astronaut()).resize(horse.shape[::-1]))
    white_horse = np.where(horse[..., None], 255, 0).astype(np.uint8).repeat(3, axis=-1)
    processor = SetokImageProcessor(size={"height": 64, "width": 64})
    on_photo = processor(photo, masks=horse, return_tensors="pt")["target_masks"]
    drawn = processor(white_horse, return_tensors="pt")["pixel_values"][0, 0] > 0
    assert torch.equal(on_photo[0], drawn)  # the photo under the mask changes nothing
    assert abs(on_photo.float().mean().item() - horse.mean()) < 0.01


def test_no_masks_no_target_masks(rgb):
    assert "target_masks" not in SetokImageProcessor()(rgb)


@pytest.mark.parametrize(
    "masks, error",
    [
        ([np.ones((10, 10), bool)] * 2, "one mask per image: 2 masks for 1 images"),
        (np.ones((9, 10), bool), r"`masks\[0\]` is 9 x 10 \(height x width\), its image 10 x 10"),
        (np.zeros((10, 10), bool), r"`masks\[0\]` is empty"),
        (np.full((10, 10), 3, np.uint8), r"`masks\[0\]`: bad mask values: .*found 1 distinct: 3"),
        ("mask.png", r"`masks\[0\]`: unknown mask form"),
    ],
)
def test_bad_masks_are_refused(masks, error):
    with pytest.raises(ValueError, match=error):
        SetokImageProcessor()(np.zeros((10, 10, 3), np.uint8), masks=masks)
