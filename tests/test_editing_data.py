"""Image-editing loaders: InstructPix2Pix's and MagicBrush's column layouts (in memory and saved with
`save_to_disk`) and the folder + JSONL form, on triplets written here from real photos (scikit-image's astronaut,
chelsea and coffee); the three layouts of the same triplets give the same records; bad triplets are named."""

import json
import logging

import datasets
import numpy as np
import PIL.Image
import pytest
from conftest import tiny_processor

from transformers_setok.training.collators import IGNORE_INDEX, SetokimChatCollator
from transformers_setok.training.data import (
    CONVERSATION_FEATURES,
    EDITING_FEATURES,
    DataValidationError,
    edits_to_messages,
    load_editing_jsonl,
    load_instructpix2pix,
    load_magicbrush,
)
from transformers_setok.training.masks import decode_mask

HEIGHT, WIDTH = 64, 96
INSTRUCTIONS = ["turn the astronaut into a cat", "make it a cup of coffee"]


def region() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[10:40, 20:70] = True
    return mask


@pytest.fixture
def folder(tmp_path, photos):
    """a.png (astronaut), b.png (chelsea), c.png (coffee), all HEIGHT x WIDTH, and mask.png (`region`)."""
    for name, photo in (("a", "astronaut"), ("b", "chelsea"), ("c", "coffee")):
        PIL.Image.fromarray(photos[photo]).resize((WIDTH, HEIGHT)).save(tmp_path / f"{name}.png")
    PIL.Image.fromarray(region().astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def good_lines() -> list[dict]:
    """Two triplets: a -> b with a mask, a -> c without."""
    return [
        {"source": "a.png", "instruction": INSTRUCTIONS[0], "target": "b.png", "mask": "mask.png"},
        {"source": "a.png", "instruction": INSTRUCTIONS[1], "target": "c.png"},
    ]


def opened(folder, name):
    return PIL.Image.open(folder / name)


def magicbrush_table(folder, masks=("mask.png", None)) -> datasets.Dataset:
    """`good_lines` in MagicBrush's layout (`osunlp/MagicBrush`'s columns and features)."""
    features = datasets.Features(
        {
            "img_id": datasets.Value("string"),
            "turn_index": datasets.Value("int32"),
            "source_img": datasets.Image(),
            "mask_img": datasets.Image(),
            "instruction": datasets.Value("string"),
            "target_img": datasets.Image(),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "img_id": ["1", "2"],
            "turn_index": [1, 1],
            "source_img": [opened(folder, "a.png")] * 2,
            "mask_img": [None if mask is None else opened(folder, mask) for mask in masks],
            "instruction": INSTRUCTIONS,
            "target_img": [opened(folder, "b.png"), opened(folder, "c.png")],
        },
        features=features,
    )


def instructpix2pix_table(folder, source_column="input_image") -> datasets.Dataset:
    """`good_lines` in InstructPix2Pix's layout, without masks."""
    features = datasets.Features(
        {source_column: datasets.Image(), "edit_prompt": datasets.Value("string"), "edited_image": datasets.Image()}
    )
    return datasets.Dataset.from_dict(
        {
            source_column: [opened(folder, "a.png")] * 2,
            "edit_prompt": INSTRUCTIONS,
            "edited_image": [opened(folder, "b.png"), opened(folder, "c.png")],
        },
        features=features,
    )


def as_arrays(records) -> list[tuple]:
    """Each record's pixels, instruction and decoded mask: what two layouts of the same triplets must agree on."""
    rows = []
    for record in records:
        pixels = tuple(np.asarray(image).tobytes() for image in record["images"])
        mask = None if record["edit_mask"] is None else decode_mask(record["edit_mask"]).tobytes()
        rows.append((pixels, record["instruction"], mask))
    return rows


def test_jsonl_round_trip(folder, photos):
    records = load_editing_jsonl(write_jsonl(folder / "edits.jsonl", good_lines()))
    assert records.features == EDITING_FEATURES and len(records) == 2
    source, target = records[0]["images"]
    assert source.size == target.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(source), np.asarray(opened(folder, "a.png")))
    np.testing.assert_array_equal(np.asarray(target), np.asarray(opened(folder, "b.png")))
    assert records["instruction"] == INSTRUCTIONS
    np.testing.assert_array_equal(decode_mask(records[0]["edit_mask"]), region())
    assert records[1]["edit_mask"] is None


def test_jsonl_paths_relative_to_image_folder_and_other_mask_forms(folder):
    (folder / "lists").mkdir()
    polygon = [[20, 10, 69, 10, 69, 39, 20, 39]]  # x 20..69, y 10..39: `region`, edges included
    lines = [{**good_lines()[0], "mask": polygon}]
    records = load_editing_jsonl(write_jsonl(folder / "lists" / "edits.jsonl", lines), image_folder=folder)
    np.testing.assert_array_equal(decode_mask(records[0]["edit_mask"]), region())


def test_magicbrush_round_trip_in_memory_and_saved(folder, tmp_path):
    table = magicbrush_table(folder)
    records = load_magicbrush(table)
    assert records.features == EDITING_FEATURES
    assert as_arrays(records) == as_arrays(load_editing_jsonl(write_jsonl(folder / "e.jsonl", good_lines())))
    table.save_to_disk(tmp_path / "saved")
    assert as_arrays(load_magicbrush(str(tmp_path / "saved"))) == as_arrays(records)
    no_masks = load_magicbrush(table, mask_column=None)
    assert no_masks["edit_mask"] == [None, None]


def test_instructpix2pix_round_trip_both_source_names(folder, tmp_path):
    from_jsonl = as_arrays(load_editing_jsonl(write_jsonl(folder / "e.jsonl", good_lines())))
    without_masks = [(pixels, instruction, None) for pixels, instruction, _ in from_jsonl]
    for source_column in ("input_image", "original_image"):  # diffusers' examples; timbrooks/...-clip-filtered
        table = instructpix2pix_table(folder, source_column)
        records = load_instructpix2pix(table)
        assert records.features == EDITING_FEATURES
        assert as_arrays(records) == without_masks
    table.save_to_disk(tmp_path / "saved")
    assert as_arrays(load_instructpix2pix(str(tmp_path / "saved"))) == without_masks


def test_column_names_can_be_overridden_and_paths_are_images(folder):
    table = datasets.Dataset.from_dict(
        {"before": [str(folder / "a.png")], "prompt": [INSTRUCTIONS[0]], "after": [str(folder / "b.png")]}
    )
    records = load_instructpix2pix(table, source_column="before", instruction_column="prompt", target_column="after")
    assert as_arrays(records) == [as_arrays(load_magicbrush(magicbrush_table(folder), mask_column=None))[0]]


def test_missing_columns_are_named(folder):
    table = instructpix2pix_table(folder)
    with pytest.raises(ValueError, match=r"no 'source_img' column \(`source_column`\)"):
        load_magicbrush(table)
    table = magicbrush_table(folder).remove_columns("mask_img")
    with pytest.raises(ValueError, match=r"no 'mask_img' column \(`mask_column` \(`mask_column=None` reads no"):
        load_magicbrush(table)
    with pytest.raises(ValueError, match=r"no 'edit' column \(`instruction_column`\)"):
        load_instructpix2pix(instructpix2pix_table(folder), instruction_column="edit")
    with pytest.raises(TypeError, match="read a `datasets.Dataset`"):
        load_instructpix2pix(instructpix2pix_table(folder).to_iterable_dataset())


def test_transparent_colour_mask_is_read_as_the_region(folder):
    # DALL-E 2's mask convention: the photo itself, fully transparent where it is to be edited.
    photo = np.asarray(opened(folder, "a.png").convert("RGBA")).copy()
    photo[..., 3] = 255
    photo[region(), 3] = 0
    PIL.Image.fromarray(photo).save(folder / "dalle.png")
    records = load_magicbrush(magicbrush_table(folder, masks=("dalle.png", None)))
    np.testing.assert_array_equal(decode_mask(records[0]["edit_mask"]), region())
    # Without transparent pixels a colour image is no mask, and is refused as a segmentation mask would be.
    with pytest.raises(DataValidationError, match="record 0: bad mask values: .*a colour image"):
        load_magicbrush(magicbrush_table(folder, masks=("a.png", None)))


def test_edits_to_messages_is_the_chat_the_collator_trains(folder):
    records = load_editing_jsonl(write_jsonl(folder / "e.jsonl", good_lines()))
    chats = edits_to_messages(records)
    assert chats.features == CONVERSATION_FEATURES
    assert chats[0]["messages"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": INSTRUCTIONS[0]}]},
        {"role": "assistant", "content": [{"type": "image", "text": None}]},
    ]
    np.testing.assert_array_equal(np.asarray(chats[0]["images"][1]), np.asarray(records[0]["images"][1]))
    processor = tiny_processor()
    batch = SetokimChatCollator(processor)([chats[0]])
    placeholders = (batch["input_ids"][0] == processor.image_token_id).nonzero().flatten().tolist()
    assert len(placeholders) == 2 and batch["pixel_values"].shape[0] == 2
    # The source is read, the target drawn: only the second placeholder is a label.
    assert batch["labels"][0, placeholders].tolist() == [IGNORE_INDEX, processor.image_token_id]
    with pytest.raises(ValueError, match=r"no \['instruction'\] column"):
        edits_to_messages(records.remove_columns("instruction"))


# --- Bad triplets ---


@pytest.fixture
def odd_files(folder):
    """tall.png (one row taller than the others), broken.png (no image) and small_mask.png (one column short)."""
    PIL.Image.open(folder / "b.png").resize((WIDTH, HEIGHT + 1)).save(folder / "tall.png")
    (folder / "broken.png").write_bytes(b"this is no PNG")
    PIL.Image.fromarray(np.ones((HEIGHT, WIDTH - 1), dtype=np.uint8) * 255).save(folder / "small_mask.png")
    PIL.Image.fromarray(np.zeros((HEIGHT, WIDTH), dtype=np.uint8)).save(folder / "empty_mask.png")
    return folder


GOOD = {"source": "a.png", "instruction": "make it a cat", "target": "b.png"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source": None}, "line 1: missing source image: a record needs a path in 'source'"),
        ({"target": ""}, "line 1: missing target image"),
        ({"target": "nowhere.png"}, r"line 1: missing image file: .*nowhere.png"),
        ({"source": ["a.png"]}, "line 1: malformed image field: expected a path in 'source'"),
        ({"instruction": ""}, "line 1: empty instruction"),
        ({"instruction": "  \n"}, "line 1: empty instruction"),
        ({"instruction": None}, "line 1: empty instruction"),
        ({"instruction": 3}, "line 1: malformed instruction: expected a string, got 3"),
        ({"instruction": "<image> make it a cat"}, "line 1: placeholder in text part"),
        (
            {"target": "tall.png"},
            r"line 1: image size mismatch: the source is 64 x 96 \(height x width\), the target 65 x 96",
        ),
        ({"target": "broken.png"}, r"line 1: unreadable image: .*broken.png: not an image PIL can read"),
        ({"mask": "small_mask.png"}, "line 1: mask size mismatch: the mask is 64 x 95"),
        ({"mask": "empty_mask.png"}, "line 1: empty mask"),
        ({"mask": "nowhere.png"}, "line 1: missing mask file"),
    ],
)
def test_jsonl_bad_triplets_are_named(odd_files, change, message):
    line = {key: value for key, value in {**GOOD, **change}.items()}
    path = write_jsonl(odd_files / "bad.jsonl", [line])
    with pytest.raises(DataValidationError, match=rf"bad.jsonl, {message}"):
        load_editing_jsonl(path)


def test_jsonl_bad_triplets_are_skipped_and_counted(odd_files, caplog):
    lines = [GOOD, {**GOOD, "instruction": ""}, {**GOOD, "target": "tall.png"}, {**GOOD, "source": None}, GOOD]
    with caplog.at_level(logging.WARNING):
        records = load_editing_jsonl(write_jsonl(odd_files / "mixed.jsonl", lines), on_error="skip")
    assert len(records) == 2
    assert "Skipped 3 of 5 records" in caplog.text
    assert "1 empty instruction (line 2); 1 image size mismatch (line 3); 1 missing source image (line 4)" in (
        caplog.text
    )


def test_dataset_bad_rows_are_named_by_index_and_skipped(odd_files, caplog):
    a, b = opened(odd_files, "a.png"), opened(odd_files, "b.png")
    rows = {
        "source_img": [a, None, a, a, a],
        "instruction": ["good", "no source", "", "taller target", "broken target"],
        "target_img": [b, b, b, opened(odd_files, "tall.png"), {"bytes": b"this is no PNG", "path": None}],
    }
    features = datasets.Features(
        {"source_img": datasets.Image(), "instruction": datasets.Value("string"), "target_img": datasets.Image()}
    )
    table = datasets.Dataset.from_dict(rows, features=features)
    with pytest.raises(DataValidationError, match="the dataset, record 1: missing source image: image 0, the source"):
        load_magicbrush(table, mask_column=None)
    with caplog.at_level(logging.WARNING):
        assert load_magicbrush(table, mask_column=None, on_error="skip")["instruction"] == ["good"]
    assert (
        "Skipped 4 of 5 records of the dataset: 1 missing source image (record 1); 1 empty instruction (record 2); "
        "1 image size mismatch (record 3); 1 unreadable image (record 4)"
    ) in caplog.text


def test_nothing_good_left_is_an_error(odd_files):
    path = write_jsonl(odd_files / "bad.jsonl", [{**GOOD, "instruction": ""}])
    with pytest.raises(ValueError, match="All 1 records of .*bad.jsonl are bad: 1 empty instruction"):
        load_editing_jsonl(path, on_error="skip")
