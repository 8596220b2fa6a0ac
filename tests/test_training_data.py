"""Training data loaders: schemas, contents, every kind of bad input in both modes (one matrix, `BAD_INPUTS`), and
bad arguments."""

import functools
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import PIL.Image
import pytest

from transformers_setok.training.data import (
    CONVERSATION_FEATURES,
    IMAGE_TEXT_FEATURES,
    DataValidationError,
    _text_to_parts,
    captions_to_generation_messages,
    captions_to_messages,
    load_hub_dataset,
    load_image_text_jsonl,
    load_llava_json,
)

SIZES = {"a.png": (8, 6), "b.png": (5, 7), "c.png": (4, 4)}  # distinct sizes tell the images apart once decoded
IMAGE = {"type": "image", "text": None}  # an image part as Arrow gives it back


def text(value: str) -> dict:
    return {"type": "text", "text": value}


@pytest.fixture
def folder(tmp_path):
    """tmp_path/images with three small real PNGs, one file that is not an image and one PNG cut short."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (width, height) in SIZES.items():
        PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.png").write_bytes(b"not a png at all")
    whole = (images / "a.png").read_bytes()
    (images / "truncated.png").write_bytes(whole[: len(whole) // 2])  # the header is whole, the pixels are not
    return images


def write_json(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def write_jsonl(path, lines) -> str:
    """One line a record; a str or bytes is a raw line, written as it is."""
    raw = [
        line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
        for line in lines
    ]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return str(path)


def image_paths(dataset) -> list[list[str]]:
    """The stored paths, without decoding."""
    undecoded = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return [[image["path"] for image in images] for images in undecoded["images"]]


def image_sizes(dataset) -> list[list[tuple]]:
    return [[image.size for image in images] for images in dataset["images"]]


# --- Splitting text at placeholders ---


@pytest.mark.parametrize(
    "value, parts",
    [
        ("<image>\nWhat is it?", [{"type": "image"}, text("What is it?")]),
        ("What is it?\n<image>", [text("What is it?"), {"type": "image"}]),
        (
            "Compare <image> and <image>.",
            [text("Compare "), {"type": "image"}, text(" and "), {"type": "image"}, text(".")],
        ),
        ("<image>\n<image>\nSame?", [{"type": "image"}, {"type": "image"}, text("Same?")]),
        ("<image>\n\nWhat?", [{"type": "image"}, text("\nWhat?")]),  # only the one newline next to it goes
        ("<image>\r\nWhat is it?", [{"type": "image"}, text("What is it?")]),  # Windows newlines go too
        ("What is it?\r\n<image>", [text("What is it?"), {"type": "image"}]),
        ("Line one\nline two", [text("Line one\nline two")]),
        ("<image>", [{"type": "image"}]),
        ("", [text("")]),
    ],
)
def test_text_to_parts(value, parts):
    assert _text_to_parts(value) == parts


# --- LLaVA JSON ---

LLAVA_RECORDS = [
    {
        "id": "one",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "Noise."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {
        "id": "two",
        "image": ["b.png", "c.png"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Compare <image> with\n<image>"},
            {"from": "gpt", "value": "The first is taller."},
        ],
    },
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},  # text only, no id
]
LLAVA_MESSAGES = [
    [
        {"role": "user", "content": [IMAGE, text("What is it?")]},
        {"role": "assistant", "content": [text("Noise.")]},
        {"role": "user", "content": [text("Sure?")]},
        {"role": "assistant", "content": [text("Yes.")]},
    ],
    [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [text("Compare "), IMAGE, text(" with"), IMAGE]},
        {"role": "assistant", "content": [text("The first is taller.")]},
    ],
    [{"role": "user", "content": [text("Hi")]}, {"role": "assistant", "content": [text("Hello.")]}],
]


def test_llava_json(tmp_path, folder):
    dataset = load_llava_json(write_json(tmp_path / "train.json", LLAVA_RECORDS), folder)
    assert dataset.features == CONVERSATION_FEATURES
    assert dataset["messages"] == LLAVA_MESSAGES
    assert image_paths(dataset) == [[str(folder / "a.png")], [str(folder / "b.png"), str(folder / "c.png")], []]
    assert image_sizes(dataset) == [[SIZES["a.png"]], [SIZES["b.png"], SIZES["c.png"]], []]
    assert isinstance(dataset[0]["images"][0], PIL.Image.Image)


def test_llava_jsonl_with_images_next_to_it(folder):
    # No `image_folder`: paths are relative to the JSON file's folder.
    path = write_jsonl(folder / "train.jsonl", LLAVA_RECORDS)
    dataset = load_llava_json(path)
    assert dataset["messages"] == LLAVA_MESSAGES
    assert image_sizes(dataset)[1] == [SIZES["b.png"], SIZES["c.png"]]


def llava(image, value, **extra) -> dict:
    return {
        "image": image,
        "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "ok"}],
    } | extra


def test_llava_json_with_a_bom_loads(tmp_path, folder):
    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(LLAVA_RECORDS).encode())
    assert load_llava_json(path, folder)["messages"] == LLAVA_MESSAGES


def test_llava_skip_drops_exactly_the_bad_records_and_logs_them(tmp_path, folder, caplog):
    records = [
        LLAVA_RECORDS[0],
        llava("gone.png", "<image>", id="b"),
        LLAVA_RECORDS[1],
        llava("a.png", "no placeholder"),
        llava("gone.png", "<image>", id="e"),
        LLAVA_RECORDS[2],
    ]
    path = write_json(tmp_path / "train.json", records)
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        dataset = load_llava_json(path, folder, on_error="skip")
    assert dataset["messages"] == LLAVA_MESSAGES
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.name.startswith("transformers_setok")
    assert record.getMessage() == (
        f"Skipped 3 of 6 records of {path}: 2 missing image file (record 1 (id 'b'), record 4 (id 'e')); "
        "1 placeholder count mismatch (record 3)."
    )


def test_skip_summary_names_the_first_few(tmp_path, folder, caplog):
    records = [LLAVA_RECORDS[2]] + [llava("gone.png", "<image>", id=str(index)) for index in range(5)]
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        load_llava_json(write_json(tmp_path / "train.json", records), folder, on_error="skip")
    assert "5 missing image file (record 1 (id '0'), record 2 (id '1'), record 3 (id '2'), ...)" in caplog.text


def test_verify_images_reads_past_the_header(tmp_path, folder):
    path = write_json(tmp_path / "train.json", [llava("truncated.png", "<image>", id="k")])
    assert len(load_llava_json(path, folder)) == 1  # its header is whole, and by default only the header is read
    with pytest.raises(DataValidationError, match=r"\(id 'k'\): unreadable image: .*truncated\.png"):
        load_llava_json(path, folder, verify_images=True)


def test_llava_empty_and_all_bad(tmp_path, folder):
    with pytest.raises(ValueError, match="holds no records"):
        load_llava_json(write_json(tmp_path / "empty.json", []), folder)
    path = write_json(tmp_path / "bad.json", [llava("gone.png", "<image>"), llava("gone.png", "<image>")])
    with pytest.raises(ValueError, match="All 2 records of .* are bad: 2 missing image file"):
        load_llava_json(path, folder, on_error="skip")


# --- Image-text JSONL ---

IMAGE_TEXT_LINES = [
    {"image": "a.png", "caption": "A square of noise.", "concepts": ["noise", "square"]},
    {"image": "b.png", "caption": "Tall noise."},
    "",  # blank lines are no records
    {"image": "c.png", "concepts": ["tiny square"], "caption": "  "},  # a blank caption counts as none
]


def test_image_text_jsonl(tmp_path, folder):
    dataset = load_image_text_jsonl(write_jsonl(tmp_path / "pairs.jsonl", IMAGE_TEXT_LINES), folder)
    assert dataset.features == IMAGE_TEXT_FEATURES
    assert dataset["caption"] == ["A square of noise.", "Tall noise.", None]
    assert dataset["concepts"] == [["noise", "square"], [], ["tiny square"]]
    assert image_paths(dataset) == [[str(folder / name)] for name in ("a.png", "b.png", "c.png")]
    assert image_sizes(dataset) == [[SIZES[name]] for name in ("a.png", "b.png", "c.png")]


def test_image_text_skip(tmp_path, folder, caplog):
    lines = [IMAGE_TEXT_LINES[0], "{oops", {"image": "b.png"}, IMAGE_TEXT_LINES[1], '{"image": "a.png",']
    path = write_jsonl(tmp_path / "pairs.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        dataset = load_image_text_jsonl(path, folder, on_error="skip")
    assert dataset["caption"] == ["A square of noise.", "Tall noise."]
    assert f"Skipped 3 of 5 records of {path}: 2 bad JSON (line 2, line 5); 1 no caption or concepts (line 3)." in (
        caplog.text
    )


def test_image_text_jsonl_bom_next_to_bad_encoding(tmp_path, folder, caplog):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(IMAGE_TEXT_LINES[0]).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b'\n{"image": "b.png", "caption": "caf\xe9"}\n' + good + b"\n")
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        dataset = load_image_text_jsonl(path, folder, on_error="skip")  # line 1's BOM is no bad JSON
    assert dataset["caption"] == ["A square of noise."] * 2
    assert "Skipped 1 of 3 records" in caplog.text and "1 bad encoding (line 2)" in caplog.text


def test_image_text_empty(tmp_path, folder):
    with pytest.raises(ValueError, match="holds no records"):
        load_image_text_jsonl(write_jsonl(tmp_path / "pairs.jsonl", ["", "  "]), folder)


def test_captions_to_messages(tmp_path, folder, caplog):
    pairs = load_image_text_jsonl(write_jsonl(tmp_path / "pairs.jsonl", IMAGE_TEXT_LINES), folder)
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        dataset = captions_to_messages(pairs, prompt="Caption it.")
    assert "left out 1 of 3 records" in caplog.text
    assert dataset.features == CONVERSATION_FEATURES
    assert dataset["messages"] == [
        [
            {"role": "user", "content": [IMAGE, text("Caption it.")]},
            {"role": "assistant", "content": [text(caption)]},
        ]
        for caption in ("A square of noise.", "Tall noise.")
    ]
    assert image_paths(dataset) == image_paths(pairs)[:2]  # still the files, not re-encoded copies
    assert image_sizes(dataset) == [[SIZES["a.png"]], [SIZES["b.png"]]]
    concepts_only = pairs.filter(lambda caption: caption is None, input_columns="caption")
    with pytest.raises(ValueError, match="none of the 1 records has a caption"):
        captions_to_messages(concepts_only)


def test_captions_to_generation_messages(tmp_path, folder, caplog):
    pairs = load_image_text_jsonl(write_jsonl(tmp_path / "pairs.jsonl", IMAGE_TEXT_LINES), folder)
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        dataset = captions_to_generation_messages(pairs, template="Draw {}, please.")
    assert "captions_to_generation_messages: left out 1 of 3 records" in caplog.text
    assert dataset.features == CONVERSATION_FEATURES
    # The user asks in words (no image), the assistant answers with the image.
    assert dataset["messages"] == [
        [
            {"role": "user", "content": [text(f"Draw {caption}, please.")]},
            {"role": "assistant", "content": [IMAGE]},
        ]
        for caption in ("A square of noise.", "Tall noise.")
    ]
    assert image_paths(dataset) == image_paths(pairs)[:2]  # still the files, not re-encoded copies
    assert image_sizes(dataset) == [[SIZES["a.png"]], [SIZES["b.png"]]]
    assert captions_to_generation_messages(pairs)["messages"][1][0]["content"] == [
        text("Generate an image of Tall noise.")
    ]  # the default template, filled as is
    concepts_only = pairs.filter(lambda caption: caption is None, input_columns="caption")
    with pytest.raises(ValueError, match="captions_to_generation_messages: none of the 1 records has a caption"):
        captions_to_generation_messages(concepts_only)


# --- Hub datasets ---


def photo(folder, name: str) -> PIL.Image.Image:
    return PIL.Image.open(folder / name)


@pytest.fixture
def hub_rows(folder):
    """Rows as a Hub dataset holds them: embedded images, structured parts, extra columns."""
    return {
        "id": ["r0", "r1", "r2"],
        "images": [[photo(folder, "a.png")], [photo(folder, "b.png"), photo(folder, "c.png")], []],
        "messages": [
            [
                {"role": "user", "content": [{"type": "image"}, text("What is it?")]},
                {"role": "assistant", "content": [text("Noise.")]},
            ],
            [
                {"role": "user", "content": [text("Compare "), {"type": "image"}, {"type": "image"}]},
                {"role": "assistant", "content": [text("Different.")]},
            ],
            [{"role": "user", "content": [text("Hi")]}, {"role": "assistant", "content": [text("Hello.")]}],
        ],
        "source": ["x", "y", "z"],
    }


HUB_MESSAGES = [
    [{"role": "user", "content": [IMAGE, text("What is it?")]}, {"role": "assistant", "content": [text("Noise.")]}],
    [
        {"role": "user", "content": [text("Compare "), IMAGE, IMAGE]},
        {"role": "assistant", "content": [text("Different.")]},
    ],
    [{"role": "user", "content": [text("Hi")]}, {"role": "assistant", "content": [text("Hello.")]}],
]


def test_hub_dataset_saved_to_disk(tmp_path, hub_rows):
    datasets.Dataset.from_dict(hub_rows).save_to_disk(tmp_path / "saved")
    dataset = load_hub_dataset(str(tmp_path / "saved"))
    assert dataset.features == CONVERSATION_FEATURES  # `id` and `source` are gone
    assert dataset["messages"] == HUB_MESSAGES
    assert image_sizes(dataset) == [[SIZES["a.png"]], [SIZES["b.png"], SIZES["c.png"]], []]


def test_hub_dataset_dict_split(tmp_path, hub_rows):
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(hub_rows), test=datasets.Dataset.from_dict(hub_rows)
    )
    splits.save_to_disk(tmp_path / "saved")
    assert load_hub_dataset(tmp_path / "saved", split="test")["messages"] == HUB_MESSAGES
    with pytest.raises(ValueError, match=r"no split 'validation' \(`split`\); its splits are \['train', 'test'\]"):
        load_hub_dataset(tmp_path / "saved", split="validation")


def test_hub_single_image_column_and_string_contents(folder):
    dataset = datasets.Dataset.from_dict(
        {
            "image": [photo(folder, name) for name in ("a.png", "b.png", "c.png")],
            "messages": [
                # TRL's convention: no placeholder anywhere, so the image opens the first user message
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What?"}],
                [{"role": "user", "content": "What is\n<image>"}, {"role": "assistant", "content": "Noise."}],
                [{"role": "user", "content": [text("Look: "), {"type": "image"}]}],
            ],
        },
        on_mixed_types="use_json",  # string and list contents side by side, as some Hub sets have them
    )
    dataset = load_hub_dataset(dataset)
    assert dataset.features == CONVERSATION_FEATURES
    assert dataset["messages"] == [
        [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": [IMAGE, text("What?")]}],
        [{"role": "user", "content": [text("What is"), IMAGE]}, {"role": "assistant", "content": [text("Noise.")]}],
        [{"role": "user", "content": [text("Look: "), IMAGE]}],
    ]
    assert image_sizes(dataset) == [[SIZES[name]] for name in ("a.png", "b.png", "c.png")]


def user(*content) -> list:
    return [{"role": "user", "content": list(content)}]


def hub_dataset(images: list[list], messages: list, ids=None) -> datasets.Dataset:
    """Images as file paths (str) or, when any is bytes, embedded; messages as JSON, so that malformed ones can sit
    next to good ones."""
    embedded = any(isinstance(image, bytes) for row in images for image in row)
    if embedded:
        images = [[{"bytes": image, "path": None} for image in row] for row in images]
    rows = {"images": images, "messages": messages} | ({"id": ids} if ids else {})
    image = datasets.Image() if embedded else datasets.Value("string")
    return datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {"images": datasets.List(image), "messages": datasets.Json()}
            | ({"id": datasets.Value("string")} if ids else {})
        ),
    )


def test_hub_image_paths_column(folder):
    good = user({"type": "image"})
    dataset = load_hub_dataset(hub_dataset([[str(folder / "a.png")]], [good]))
    assert image_paths(dataset) == [[str(folder / "a.png")]]
    assert image_sizes(dataset) == [[SIZES["a.png"]]]


def test_hub_skip_and_embedded_bytes(folder, caplog):
    good = user({"type": "image"}, text("Hi"))
    rows = datasets.Dataset.from_dict(
        {
            "id": ["a", "b", "c", "d"],
            "images": [[photo(folder, "a.png")], [photo(folder, "b.png")], [], [photo(folder, "c.png")]],
            "messages": [good, user(text("Hi")), good, good],
        }
    )
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        dataset = load_hub_dataset(rows, on_error="skip", verify_images=True)
    assert image_sizes(dataset) == [[SIZES["a.png"]], [SIZES["c.png"]]]
    assert (
        "Skipped 2 of 4 records of the dataset: 2 placeholder count mismatch (record 1 (id 'b'), record 2 (id 'c'))."
        in caplog.text
    )
    with pytest.raises(ValueError, match=r"All 1 records of the dataset are bad: 1 placeholder count mismatch"):
        load_hub_dataset(rows.select([1]), on_error="skip")


def test_hub_local_data_files(tmp_path, folder):
    # A folder of data files rather than a `save_to_disk` one: `load_dataset` reads it.
    chats = tmp_path / "chats"
    chats.mkdir()
    write_jsonl(chats / "train.jsonl", [{"images": [str(folder / "a.png")], "messages": user({"type": "image"})}])
    dataset = load_hub_dataset(chats)
    assert dataset["messages"] == [[{"role": "user", "content": [IMAGE]}]]
    assert image_sizes(dataset) == [[SIZES["a.png"]]]


def test_hub_bad_columns_and_empty(hub_rows):
    dataset = datasets.Dataset.from_dict(hub_rows)
    with pytest.raises(ValueError, match=r"no 'pictures' column \(`image_column`\); its columns are \['id'"):
        load_hub_dataset(dataset, image_column="pictures")
    with pytest.raises(ValueError, match=r"no 'chat' column \(`messages_column`\)"):
        load_hub_dataset(dataset, messages_column="chat")
    with pytest.raises(ValueError, match="the dataset holds no records"):
        load_hub_dataset(dataset.select([]))


# --- Bad inputs: one matrix for every loader ---


class Raw(bytes):
    """A whole file as it is: for what breaks the document, not one record."""


@dataclass(frozen=True)
class Bad:
    """A bad input, read after one good record, and what the loader must make of it."""

    loader: str  # a key of KEPT: "llava" (a JSON list), "llava_jsonl", "pairs" (image-text JSONL) or "hub"
    bad: object  # a record (JSON Lines: a str or bytes is a raw line); a Raw: the whole file; hub: (images, messages)
    where: str  # what the error names after the source; "" when it names the source alone
    reason: str  # what the skip summary counts the record as
    detail: str = ""  # a piece of the rest of the message; {folder} is the image folder
    skippable: bool = True  # False: the whole input fails whatever `on_error` says
    options: dict = field(default_factory=dict)  # more loader arguments


# What each loader keeps of [good record, bad input] when it skips: (column, values).
KEPT = {
    "llava": ("messages", LLAVA_MESSAGES[:1]),
    "llava_jsonl": ("messages", LLAVA_MESSAGES[:1]),
    "pairs": ("caption", ["A square of noise."]),
    "hub": ("messages", [[{"role": "user", "content": [IMAGE, text("Hi")]}]]),
}


def bad(case_id: str, *args, **kwargs):
    return pytest.param(Bad(*args, **kwargs), id=case_id)


NOT_AN_IMAGE = "unreadable image", "{folder}/broken.png: not an image PIL can read"
VERIFY = dict(options={"verify_images": True})
HUB_BAD = "record 1 (id 'bad')"  # where every hub case's bad record is

# Later checks add their cases here. A line: the case id, the loader, the bad input, where the error points, the
# reason, a piece of the detail.
BAD_INPUTS = [
    # LLaVA JSON: a record after record 0
    bad("llava-missing-image", "llava", llava("gone.png", "<image>\nHi", id="x"),
        "record 1 (id 'x')", "missing image file", "{folder}/gone.png"),
    bad("llava-more-placeholders", "llava", llava("a.png", "<image> and <image>"),
        "record 1", "placeholder count mismatch", "2 image placeholders for 1 images"),
    bad("llava-no-placeholder", "llava", llava("a.png", "No placeholder"),
        "record 1", "placeholder count mismatch", "0 image placeholders for 1 images"),
    bad("llava-no-image", "llava", llava(None, "<image>\nHi"),
        "record 1", "placeholder count mismatch", "1 image placeholders for 0 images"),
    bad("llava-image-not-a-path", "llava", llava(["a.png", 3], "<image><image>"),
        "record 1", "malformed image field"),
    bad("llava-unknown-role", "llava",
        {"id": 7, "image": "a.png", "conversations": [{"from": "bot", "value": "<image>"}]},
        "record 1 (id '7')", "unknown role", "conversations[0] is from 'bot'"),
    bad("llava-turn-without-value", "llava", {"id": "y", "conversations": [{"from": "human"}]},
        "record 1 (id 'y')", "malformed message", "conversations[0]"),
    bad("llava-no-conversations", "llava", {"id": "z", "image": "a.png"},
        "record 1 (id 'z')", "malformed message", "'conversations' must be"),
    bad("llava-not-an-object", "llava", "just a string", "record 1", "malformed record"),
    bad("llava-not-an-image", "llava", llava("broken.png", "<image>", id="k"), "record 1 (id 'k')", *NOT_AN_IMAGE),
    # LLaVA JSON: the document itself, which loses every record
    bad("llava-bad-json", "llava", Raw(b'[\n{"id": "a",}\n]'),
        "line 2, column 12", "bad JSON", "Expecting property name", skippable=False),
    bad("llava-not-a-list", "llava", Raw(b'{"id": "a"}'),
        "", "bad JSON", "expected a list of records, got a dict", skippable=False),
    bad("llava-bad-encoding", "llava", Raw(b'[\n{"id": "caf\xe9"}\n]'),  # Latin-1
        "line 2", "bad encoding", "not UTF-8", skippable=False),
    # LLaVA JSON Lines: a bad line is one bad record
    bad("llava-jsonl-unclosed", "llava_jsonl", '{"id": "c", "conversations": [{"from": "human", "value": "Hi"}]',
        "line 2", "bad JSON", "column 64: Expecting ',' delimiter"),
    bad("llava-jsonl-not-an-image", "llava_jsonl", llava("broken.png", "<image>", id="k"),
        "line 2 (id 'k')", *NOT_AN_IMAGE),
    # Image-text JSON Lines
    bad("pairs-cut-short", "pairs", '{"image": "a.png", "caption": ',
        "line 2", "bad JSON", "column 31: Expecting value"),
    bad("pairs-unclosed", "pairs", '{"image": "a.png", "caption": "A cat, sat.", "concepts": ["cat"]',
        "line 2", "bad JSON", "column 65: Expecting ',' delimiter"),
    bad("pairs-bad-encoding", "pairs", b'{"image": "b.png", "caption": "caf\xe9"}',
        "line 2", "bad encoding", "not UTF-8 at byte 34 of the line"),
    bad("pairs-missing-image", "pairs", {"id": "q", "image": "gone.png", "caption": "x"},
        "line 2 (id 'q')", "missing image file", "{folder}/gone.png"),
    bad("pairs-not-an-image", "pairs", {"id": "t", "image": "broken.png", "caption": "x"},
        "line 2 (id 't')", *NOT_AN_IMAGE),
    bad("pairs-no-text", "pairs", {"image": "a.png"}, "line 2", "no caption or concepts"),
    bad("pairs-empty-text", "pairs", {"image": "a.png", "caption": "", "concepts": []},
        "line 2", "no caption or concepts"),
    bad("pairs-concepts-string", "pairs", {"image": "a.png", "concepts": "cat"}, "line 2", "malformed concepts"),
    bad("pairs-caption-number", "pairs", {"image": "a.png", "caption": 3}, "line 2", "malformed caption"),
    bad("pairs-no-image", "pairs", {"caption": "x"}, "line 2", "malformed image field"),
    bad("pairs-not-an-object", "pairs", [1, 2], "line 2", "malformed record"),
    # Hub datasets: (image file names or embedded bytes, messages) of record 1
    bad("hub-unknown-role", "hub", (["a.png"], [{"role": "robot", "content": "Hi"}]),
        HUB_BAD, "unknown role", "messages[0] has role 'robot'"),
    bad("hub-more-placeholders", "hub", (["a.png"], user({"type": "image"}, {"type": "image"})),
        HUB_BAD, "placeholder count mismatch", "2 image placeholders for 1 images"),
    bad("hub-no-image", "hub", ([], user({"type": "image"})),
        HUB_BAD, "placeholder count mismatch", "1 image placeholders for 0 images"),
    bad("hub-placeholder-in-string",  # a placeholder in a string: the images are not put first
        "hub", (["a.png", "b.png"], [{"role": "user", "content": "Hi"}, {"role": "user", "content": "<image>"}]),
        HUB_BAD, "placeholder count mismatch", "1 image placeholders for 2 images"),
    bad("hub-placeholder-in-text-part", "hub", (["a.png"], user({"type": "image"}, text("<image>"))),
        HUB_BAD, "placeholder in text part", "messages[0]"),
    bad("hub-unknown-part", "hub", (["a.png"], user({"type": "image"}, {"type": "video"})),
        HUB_BAD, "malformed message", "messages[0] has part"),
    bad("hub-text-part-without-text", "hub", (["a.png"], user({"type": "image"}, {"type": "text"})),
        HUB_BAD, "malformed message", "messages[0] has part"),
    bad("hub-content-number", "hub", (["a.png"], [{"role": "user", "content": 3}]),
        HUB_BAD, "malformed message", "messages[0] content must be"),
    bad("hub-message-string", "hub", (["a.png"], ["Hi"]), HUB_BAD, "malformed message", "messages[0] is 'Hi'"),
    bad("hub-no-messages", "hub", (["a.png"], []), HUB_BAD, "malformed message", "expected a non-empty list"),
    bad("hub-missing-image", "hub", (["gone.png"], user({"type": "image"})),
        HUB_BAD, "missing image file", "image 0: {folder}/gone.png"),
    bad("hub-not-an-image", "hub", (["broken.png"], user({"type": "image"})),
        HUB_BAD, "unreadable image", "image 0 ({folder}/broken.png): not an image"),
    bad("hub-bytes-not-an-image", "hub", ([b"not a png"], user({"type": "image"})),
        HUB_BAD, "unreadable image", "image 0: not an image"),
    bad("hub-cut-short-verified", "hub", (["truncated.png"], user({"type": "image"})),
        HUB_BAD, "unreadable image", "image 0 ({folder}/truncated.png): ", **VERIFY),  # the header alone passes
]  # fmt: skip


def open_bad_input(case: Bad, tmp_path, folder):
    """(load, source): `load(on_error=...)` reads one good record, then `case.bad`, as `case.loader` does."""
    if case.loader == "hub":
        names, messages = case.bad
        embedded = any(isinstance(name, bytes) for name in names)
        good = (folder / "a.png").read_bytes() if embedded else str(folder / "a.png")
        images = [name if isinstance(name, bytes) else str(folder / name) for name in names]
        dataset = hub_dataset([[good], images], [user({"type": "image"}, text("Hi")), messages], ids=["ok", "bad"])
        return functools.partial(load_hub_dataset, dataset, **case.options), "the dataset"
    name = {"llava": "train.json", "llava_jsonl": "train.jsonl", "pairs": "pairs.jsonl"}[case.loader]
    path = tmp_path / name
    good = IMAGE_TEXT_LINES[0] if case.loader == "pairs" else LLAVA_RECORDS[0]
    if isinstance(case.bad, Raw):
        path.write_bytes(case.bad)
    elif case.loader == "llava":
        write_json(path, [good, case.bad])
    else:
        write_jsonl(path, [good, case.bad])
    load = load_image_text_jsonl if case.loader == "pairs" else load_llava_json
    return functools.partial(load, str(path), folder, **case.options), str(path)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(tmp_path, folder, caplog, case):
    """`on_error="fail"` raises naming the source, the record and the problem; `"skip"` keeps exactly the good
    record and logs the bad one by reason, or, for a document that does not parse, fails all the same."""
    load, source = open_bad_input(case, tmp_path, folder)
    with pytest.raises(DataValidationError) as error:
        load(on_error="fail")
    assert str(error.value).startswith(f"{source}{', ' if case.where else ''}{case.where}: {case.reason}")
    assert case.detail.format(folder=folder) in str(error.value)
    assert error.value.reason == case.reason
    if not case.skippable:
        with pytest.raises(DataValidationError) as skipped:
            load(on_error="skip")
        assert str(skipped.value) == str(error.value)
        return
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        dataset = load(on_error="skip")
    column, values = KEPT[case.loader]
    assert dataset[column] == values
    [record] = caplog.records
    assert record.getMessage() == f"Skipped 1 of 2 records of {source}: 1 {case.reason} ({case.where})."


# --- Arguments ---


# (loader, its arguments, the argument that names a missing path)
MISSING_PATHS = [
    (load_llava_json, ("gone", "folder"), "json_path"),
    (load_llava_json, ("json", "gone"), "image_folder"),
    (load_image_text_jsonl, ("gone", "folder"), "jsonl_path"),
    (load_image_text_jsonl, ("json", "gone"), "image_folder"),
    (load_hub_dataset, ("gone",), "name_or_path"),
]


@pytest.mark.parametrize("loader, arguments, argument", MISSING_PATHS)
def test_missing_path(tmp_path, folder, loader, arguments, argument):
    paths = dict(gone=str(tmp_path / "gone"), folder=folder, json=write_jsonl(tmp_path / "pairs.jsonl", [{}]))
    with pytest.raises(FileNotFoundError, match=f"`{argument}`: no such .*: {paths['gone']}"):
        loader(*(paths[name] for name in arguments))


@pytest.mark.parametrize("loader", [load_llava_json, load_image_text_jsonl, load_hub_dataset])
def test_bad_on_error(tmp_path, loader):
    with pytest.raises(ValueError, match=r"`on_error` must be one of \('fail', 'skip'\), got 'ignore'"):
        loader(write_jsonl(tmp_path / "data.jsonl", [{}]), on_error="ignore")


def test_import_pulls_in_no_training_libraries():
    code = "import sys, transformers_setok.training.data; print(sorted({'trl', 'peft', 'transformers.trainer'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
