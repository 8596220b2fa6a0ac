"""Streaming loaders (`streaming=True`, training.streaming): the in-memory records, read lazily; the same skip/fail rule
(the whole bad-input matrix of test_training_data); webdataset column mappings; splitting across processes; resuming
(`state_dict`, and a Trainer resumed with `StreamStateCallback`); and every source trained under two-process DDP."""

# ruff: noqa: F401, F811 (test_training_data's fixtures `folder` and `hub_rows`, imported, are these tests' arguments)

import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import PIL.Image
import pytest
from conftest import tiny_processor, tiny_setokim, trainer_for
from streaming_ddp_script import RESUMED, SOURCES, STEPS, build_sources, record_ids, train
from test_training_data import (
    BAD_INPUTS,
    HUB_MESSAGES,
    IMAGE_TEXT_LINES,
    KEPT,
    LLAVA_RECORDS,
    SIZES,
    folder,  # a fixture
    hub_rows,  # a fixture
    image_sizes,
    open_bad_input,
    write_json,
    write_jsonl,
)

from transformers_setok.training import data
from transformers_setok.training.data import (
    CONVERSATION_FEATURES,
    IMAGE_TEXT_FEATURES,
    DataValidationError,
    captions_to_generation_messages,
    captions_to_messages,
    load_hub_dataset,
    load_image_text_jsonl,
    load_llava_json,
    load_webdataset,
)
from transformers_setok.training.streaming import (
    STREAM_STATE_FILE,
    StreamStateCallback,
    split_for_process,
    stream_hub_dataset,
    stream_webdataset,
)

TESTS = Path(__file__).parent
IMAGE = {"type": "image", "text": None}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def sizes(records) -> list[list[tuple]]:
    return [[image.size for image in record["images"]] for record in records]


def answers(records) -> list[str]:
    return [record["messages"][-1]["content"][-1]["text"] for record in records]


# --------------------------------------------------------------------------------------------------------------------
# The in-memory records, streamed


def write_parquet(rows: dict, paths: list) -> list[str]:
    """`rows` cut into len(paths) parquet files, every len(paths)-th row in each."""
    table = datasets.Dataset.from_dict(rows)
    for index, path in enumerate(paths):
        table.select(range(index, len(table), len(paths))).to_parquet(str(path))
    return [str(path) for path in paths]


def open_source(name: str, tmp_path, folder, hub_rows):
    """`load(**options)` for the source `name`, and its record column (`messages` or `caption`)."""
    if name == "llava_json":
        path = write_json(tmp_path / "train.json", LLAVA_RECORDS)
        return lambda **options: load_llava_json(path, folder, **options), "messages"
    if name == "llava_jsonl":
        path = write_jsonl(tmp_path / "train.jsonl", LLAVA_RECORDS)
        return lambda **options: load_llava_json(path, folder, **options), "messages"
    if name == "image_text_jsonl":
        path = write_jsonl(tmp_path / "pairs.jsonl", IMAGE_TEXT_LINES)
        return lambda **options: load_image_text_jsonl(path, folder, **options), "caption"
    if name == "dataset":
        return lambda **options: load_hub_dataset(datasets.Dataset.from_dict(hub_rows), **options), "messages"
    if name == "save_to_disk":
        datasets.Dataset.from_dict(hub_rows).save_to_disk(tmp_path / "saved")
        return lambda **options: load_hub_dataset(str(tmp_path / "saved"), **options), "messages"
    if name == "parquet_files":  # the Hub path, with local files
        files = write_parquet(hub_rows, [tmp_path / "a.parquet", tmp_path / "b.parquet"])
        return lambda **options: load_hub_dataset("parquet", data_files=files, **options), "messages"
    if name == "parquet_folder":
        (tmp_path / "shards").mkdir()
        write_parquet(hub_rows, [tmp_path / "shards" / f"train-{i}.parquet" for i in range(3)])
        return lambda **options: load_hub_dataset(str(tmp_path / "shards"), **options), "messages"
    if name == "json_folder":  # data files whose columns are only known once read
        (tmp_path / "chats").mkdir()
        lines = [{"images": [str(folder / "a.png")], "messages": HUB_MESSAGES[0]}, {"images": [], "messages": []}]
        write_jsonl(tmp_path / "chats" / "train.jsonl", lines)
        return lambda **options: load_hub_dataset(str(tmp_path / "chats"), on_error="skip", **options), "messages"
    raise KeyError(name)


SOURCE_NAMES = [
    "llava_json",
    "llava_jsonl",
    "image_text_jsonl",
    "dataset",
    "save_to_disk",
    "parquet_files",
    "parquet_folder",
    "json_folder",
]


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_a_stream_yields_the_records_held_in_memory(tmp_path, folder, hub_rows, name):
    load, column = open_source(name, tmp_path, folder, hub_rows)
    held, stream = load(), load(streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and stream.features == held.features
    records = list(stream)
    assert [record[column] for record in records] == held[column]
    assert sizes(records) == image_sizes(held)
    assert all(isinstance(image, PIL.Image.Image) for record in records for image in record["images"])


# --------------------------------------------------------------------------------------------------------------------
# Lazily: nothing read up front, each record checked as it comes


def counting_image_checks(monkeypatch) -> list:
    checked = []
    check = data._check_image

    def counted(file, shown, where, verify):
        checked.append(str(where))
        return check(file, shown, where, verify)

    monkeypatch.setattr(data, "_check_image", counted)
    return checked


def many_records(kind: str, tmp_path, folder, count: int = 40):
    """A stream of `count` records of `kind`, each with an image (checked when it is read)."""
    if kind == "llava_jsonl":
        records = [dict(LLAVA_RECORDS[0], id=str(index)) for index in range(count)]
        return load_llava_json(write_jsonl(tmp_path / "many.jsonl", records), folder, streaming=True)
    if kind == "image_text_jsonl":
        lines = [dict(IMAGE_TEXT_LINES[0], caption=f"c{index}") for index in range(count)]
        return load_image_text_jsonl(write_jsonl(tmp_path / "many.jsonl", lines), folder, streaming=True)
    if kind == "parquet":
        rows = {"images": [[str(folder / "a.png")]] * count, "messages": [HUB_MESSAGES[0]] * count}
        files = write_parquet(rows, [tmp_path / "a.parquet", tmp_path / "b.parquet"])
        return load_hub_dataset("parquet", data_files=files, streaming=True)
    if kind == "webdataset":
        samples = [(f"k{index}", {"png": (folder / "a.png").read_bytes(), "txt": b"a cap"}) for index in range(count)]
        path = write_tar(tmp_path / "many.tar", samples)
        return load_webdataset(path, {"image": "png", "caption": "txt"}, streaming=True)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["llava_jsonl", "image_text_jsonl", "parquet", "webdataset"])
def test_a_stream_checks_each_record_when_it_is_read(tmp_path, folder, monkeypatch, kind):
    checked = counting_image_checks(monkeypatch)
    stream = many_records(kind, tmp_path, folder)
    assert checked == [], "nothing is read before iteration"
    assert len(list(itertools.islice(stream, 3))) == 3
    assert len(checked) == 3, checked  # three records read, three checked: no pass over the other 37


def test_a_hub_stream_reads_its_source_one_record_at_a_time(folder):
    reads = []

    def rows():
        for index in range(1000):
            reads.append(index)
            yield {"images": [str(folder / "a.png")], "messages": HUB_MESSAGES[0], "id": str(index)}

    paths = datasets.List(datasets.Value("string"))
    features = datasets.Features({"images": paths, "messages": datasets.Json(), "id": datasets.Value("string")})
    stream = load_hub_dataset(datasets.IterableDataset.from_generator(rows, features=features))
    assert isinstance(stream, datasets.IterableDataset) and reads == []
    first = list(itertools.islice(stream, 2))
    assert [record["messages"] for record in first] == [HUB_MESSAGES[0]] * 2
    assert reads == [0, 1]


# --------------------------------------------------------------------------------------------------------------------
# The same skip/fail rule: test_training_data's whole matrix of bad inputs, streamed


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_streamed(tmp_path, folder, caplog, case):
    """The same error as in memory, raised when the bad record is read; skipped, the same good record kept and the
    bad one logged when it comes (and in a total at the end of a file the loader reads itself)."""
    load, source = open_bad_input(case, tmp_path, folder)
    with pytest.raises(DataValidationError) as held:
        load(on_error="fail")
    stream = load(on_error="fail", streaming=True)
    with pytest.raises(DataValidationError) as streamed:
        list(stream)
    assert str(streamed.value) == str(held.value) and streamed.value.reason == held.value.reason
    if not case.skippable:
        with pytest.raises(DataValidationError, match="bad"):
            list(load(on_error="skip", streaming=True))
        return
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        records = list(load(on_error="skip", streaming=True))
    column, values = KEPT[case.loader]
    assert [record[column] for record in records] == values
    as_it_comes = f"Skipped 1 of the 2 records of {source} read so far: 1 {case.reason} ({case.where})."
    total = f"Skipped 1 of 2 records of {source}: 1 {case.reason} ({case.where})."
    expected = [as_it_comes] if case.loader == "hub" else [as_it_comes, total]
    assert [record.getMessage() for record in caplog.records] == expected


def test_skips_are_logged_every_n_and_a_file_without_good_records_fails(tmp_path, folder, caplog, monkeypatch):
    monkeypatch.setattr(data, "STREAM_SKIP_LOG_EVERY", 2)
    bad = {"id": "x", "image": "gone.png", "conversations": LLAVA_RECORDS[0]["conversations"]}
    path = write_jsonl(tmp_path / "train.jsonl", [LLAVA_RECORDS[0]] + [bad] * 5)
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        assert len(list(load_llava_json(path, folder, on_error="skip", streaming=True))) == 1
    messages = [record.getMessage() for record in caplog.records]
    counts = ["Skipped 1 of the 2", "Skipped 2 of the 3", "Skipped 4 of the 5", "Skipped 5 of 6"]
    assert [message.split(" records")[0] for message in messages] == counts
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [bad, bad])
    with pytest.raises(ValueError, match="All 2 records of .*bad.jsonl are bad: 2 missing image file"):
        list(load_llava_json(only_bad, folder, on_error="skip", streaming=True))
    with pytest.raises(ValueError, match="holds no records"):
        list(load_llava_json(write_jsonl(tmp_path / "empty.jsonl", [""]), folder, streaming=True))


def test_captions_of_a_stream_are_left_out_lazily(tmp_path, folder, caplog):
    pairs = load_image_text_jsonl(write_jsonl(tmp_path / "pairs.jsonl", IMAGE_TEXT_LINES), folder, streaming=True)
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        chats = captions_to_messages(pairs, prompt="Caption it.")
        assert caplog.records == []  # nothing read yet
        records = list(chats)
    assert isinstance(chats, datasets.IterableDataset) and chats.features == CONVERSATION_FEATURES
    assert [record["messages"] for record in records] == [
        [{"role": "user", "content": [IMAGE, text("Caption it.")]}, {"role": "assistant", "content": [text(caption)]}]
        for caption in ("A square of noise.", "Tall noise.")
    ]
    assert sizes(records) == [[SIZES["a.png"]], [SIZES["b.png"]]]
    assert caplog.records[0].getMessage() == (
        "captions_to_messages: left out 1 of the 3 records read so far, which have concepts but no caption."
    )
    drawn = list(captions_to_generation_messages(pairs, template="Draw {}"))
    assert drawn[1]["messages"] == [
        {"role": "user", "content": [text("Draw Tall noise.")]},
        {"role": "assistant", "content": [IMAGE]},
    ]


def test_require_text_makes_a_record_without_it_bad(tmp_path, folder):
    path = write_jsonl(tmp_path / "pairs.jsonl", IMAGE_TEXT_LINES)
    kept = list(load_image_text_jsonl(path, folder, on_error="skip", require_text="caption", streaming=True))
    assert [record["caption"] for record in kept] == ["A square of noise.", "Tall noise."]
    with pytest.raises(DataValidationError, match=r"line 1: no concepts"):
        captions_only = write_jsonl(tmp_path / "b.jsonl", IMAGE_TEXT_LINES[1:])
        list(load_image_text_jsonl(captions_only, folder, require_text="concepts", streaming=True))
    assert load_image_text_jsonl(path, folder, on_error="skip", require_text="caption")["caption"][1] == "Tall noise."
    with pytest.raises(ValueError, match="`require_text` must be one of"):
        load_image_text_jsonl(path, folder, require_text="captions", streaming=True)


# --------------------------------------------------------------------------------------------------------------------
# WebDataset


def write_tar(path, samples) -> str:
    """A tar of (key, {field: bytes}) samples, each sample's members together, as webdataset writes them."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for field, content in fields.items():
                member = tarfile.TarInfo(f"{key}.{field}")
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))
    return str(path)


def as_json(value) -> bytes:
    return json.dumps(value).encode()


def test_webdataset_conversations_with_a_column_mapping(tmp_path, folder):
    chat = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "Noise."}]
    trl_chat = [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "Noise."}]  # no placeholder
    samples = [
        ("dir/s0", {"png": (folder / "a.png").read_bytes(), "json": as_json(chat)}),
        ("dir/s1", {"jpg": (folder / "b.png").read_bytes(), "json": as_json(trl_chat), "cls": b"3"}),
        ("dir/s2", {"json": as_json([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])}),
    ]
    tars = [write_tar(tmp_path / "shard-0.tar", samples[:2]), write_tar(tmp_path / "shard-1.tar", samples[2:])]
    stream = load_webdataset(tmp_path, {"image": "png;jpg", "messages": "json"}, streaming=True)
    assert stream.num_shards == 2 and stream.features == CONVERSATION_FEATURES
    records = list(stream)
    assert [record["messages"] for record in records] == [
        [
            {"role": "user", "content": [IMAGE, text("What is it?")]},
            {"role": "assistant", "content": [text("Noise.")]},
        ],
        [{"role": "user", "content": [IMAGE, text("What?")]}, {"role": "assistant", "content": [text("Noise.")]}],
        [{"role": "user", "content": [text("Hi")]}, {"role": "assistant", "content": [text("Yo")]}],
    ]
    assert sizes(records) == [[SIZES["a.png"]], [SIZES["b.png"]], []]
    held = load_webdataset(tars, {"images": "png;jpg", "messages": "json"})  # in memory, `images` for `image`
    assert isinstance(held, datasets.Dataset) and held["messages"] == [r["messages"] for r in records]
    assert image_sizes(held) == sizes(records)
    default = list(stream_webdataset(tars[0]))  # jpg, jpeg, png or webp and json
    assert [record["messages"] for record in default] == [record["messages"] for record in records[:2]]


def test_webdataset_caption_records(tmp_path, folder):
    image = (folder / "a.png").read_bytes()
    samples = [
        ("k0", {"jpg": image, "txt": b"A cat.\n"}),
        ("k1", {"jpg": image, "json": as_json({"caption": "A dog.", "concepts": ["dog"]})}),
    ]
    path = write_tar(tmp_path / "pairs.tar", samples)
    plain = list(load_webdataset(path, {"image": "jpg", "caption": "txt"}, on_error="skip", streaming=True))
    assert [(record["caption"], record["concepts"]) for record in plain] == [("A cat.", [])]  # k1 has no caption
    columns = {"image": "jpg", "caption": "json:caption", "concepts": "json:concepts"}
    mapped = load_webdataset(path, columns, on_error="skip", streaming=True)
    assert mapped.features == IMAGE_TEXT_FEATURES
    assert [(record["caption"], record["concepts"]) for record in mapped] == [("A dog.", ["dog"])]
    chats = list(captions_to_messages(mapped))
    assert chats[0]["messages"][1] == {"role": "assistant", "content": [text("A dog.")]}
    assert sizes(chats) == [[SIZES["a.png"]]]


def test_webdataset_bad_samples_are_skipped_or_fail_like_any_record(tmp_path, folder, caplog):
    image = (folder / "a.png").read_bytes()
    samples = [
        ("k0", {"png": image, "txt": b"good"}),
        ("k1", {"png": image, "txt": b"caf\xe9"}),  # Latin-1
        ("k2", {"txt": b"no image"}),
        ("k3", {"png": b"not a png", "txt": b"bad image"}),
        ("k4", {"png": image, "json": b'{"caption": '}),
        ("k5", {"png": image, "txt": b"good too"}),
    ]
    path = write_tar(tmp_path / "shard.tar", samples)
    columns = {"image": "png", "caption": "txt;json:caption"}
    with pytest.raises(DataValidationError, match=r"shard.tar, sample 1 \(id 'k1'\): bad encoding: txt: not UTF-8"):
        list(load_webdataset(path, columns, streaming=True))
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        kept = list(load_webdataset(path, columns, on_error="skip", streaming=True))
    assert [record["caption"] for record in kept] == ["good", "good too"]
    assert caplog.records[-1].getMessage() == (
        f"Skipped 4 of 6 records of {path}: 1 bad encoding (sample 1 (id 'k1')); 1 missing image (sample 2 (id 'k2')); "
        "1 unreadable image (sample 3 (id 'k3')); 1 bad JSON (sample 4 (id 'k4'))."
    )
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[2].offset_data + 10  # inside the second sample's image
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(path).read_bytes()[:cut])
    with pytest.raises(DataValidationError, match=r"broken.tar: bad tar: after 1 samples"):
        list(load_webdataset(broken, columns, on_error="skip", streaming=True))


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"image": "png"}, "must map 'messages'"),
        ({"image": "png", "messages": "json", "caption": "txt"}, "not both"),
        ({"image": "png", "images": "jpg", "messages": "json"}, "not both"),
        ({"caption": "txt"}, "need an 'image' member"),
        ({"picture": "png", "messages": "json"}, r"unknown record fields \['picture'\]"),
        ({"image": " ; ", "messages": "json"}, "names no tar member"),
        (["png", "json"], "maps record fields to tar members"),
    ],
)
def test_webdataset_bad_column_mappings(tmp_path, folder, columns, message):
    path = write_tar(tmp_path / "shard.tar", [("k", {"png": (folder / "a.png").read_bytes()})])
    with pytest.raises(ValueError, match=message):
        stream_webdataset(path, columns)


# --------------------------------------------------------------------------------------------------------------------
# Arguments


def test_stream_arguments(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match=r"`json_path`: no such file: .*gone.jsonl"):
        load_llava_json([write_jsonl(tmp_path / "a.jsonl", LLAVA_RECORDS), tmp_path / "gone.jsonl"], streaming=True)
    with pytest.raises(FileNotFoundError, match=r"`jsonl_path`: no \.jsonl files in the folder"):
        load_image_text_jsonl(folder, streaming=True)
    with pytest.raises(FileNotFoundError, match=r"`tar_paths`: no file matches .*\*\.tar"):
        load_webdataset(str(tmp_path / "*.tar"), streaming=True)
    with pytest.raises(FileNotFoundError, match="`image_folder`: no such folder"):
        load_llava_json(tmp_path / "a.jsonl", tmp_path / "gone", streaming=True)
    with pytest.raises(ValueError, match="`on_error` must be one of"):
        load_llava_json(tmp_path / "a.jsonl", on_error="ignore", streaming=True)
    files = write_parquet({"images": [[]], "messages": [HUB_MESSAGES[2]]}, [tmp_path / "x.parquet"])
    with pytest.raises(ValueError, match="`num_shards` cuts a dataset in memory"):
        stream_hub_dataset("parquet", data_files=files, num_shards=4)
    with pytest.raises(ValueError, match="the dataset holds no records"):
        stream_hub_dataset(datasets.Dataset.from_dict({"images": [], "messages": []}))
    texts = datasets.Dataset.from_dict({"images": [[]] * 3, "messages": [HUB_MESSAGES[2]] * 3})
    several = load_hub_dataset(texts, num_shards=2, streaming=True)
    assert several.num_shards == 2 and len(list(several)) == 3


# --------------------------------------------------------------------------------------------------------------------
# Several processes


def id_records(tmp_path, folder, files: int, count: int = 12) -> tuple[list[str], list[str]]:
    """`count` LLaVA records over `files` JSON Lines files (one shard each), and their ids in order."""
    ids = [f"r{index}" for index in range(count)]
    turns = [[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": i}] for i in ids]
    records = [dict(LLAVA_RECORDS[2], conversations=conversation) for conversation in turns]
    paths = [write_jsonl(tmp_path / f"part-{part}.jsonl", records[part::files]) for part in range(files)]
    return paths, ids


@pytest.mark.parametrize("files", [4, 2, 3, 1])
def test_split_for_process_gives_each_process_its_own_records(tmp_path, folder, caplog, monkeypatch, files):
    paths, ids = id_records(tmp_path, folder, files)
    stream = load_llava_json(paths, streaming=True)
    assert stream.num_shards == files
    with caplog.at_level(logging.WARNING, logger="transformers_setok"):
        parts = [answers(split_for_process(stream, rank, 2)) for rank in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(ids)
    if files % 2 == 0:  # whole shards: each process reads only its files
        by_file = [answers(load_llava_json(path, streaming=True)) for path in paths]
        assert parts == [sum(by_file[0::2], []), sum(by_file[1::2], [])]
        assert caplog.records == []
    else:  # every process reads everything and keeps every second record
        assert parts == [answers(stream)[0::2], answers(stream)[1::2]]
        assert "every process reads every record and keeps one in 2" in caplog.text
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert answers(split_for_process(stream)) == parts[1]  # `torchrun` / `accelerate launch` name the process
    monkeypatch.delenv("WORLD_SIZE")
    assert split_for_process(stream) is stream


# --------------------------------------------------------------------------------------------------------------------
# Resuming


def resumable(kind: str, tmp_path, folder):
    """A stream of 12 records, one of them bad (skipped), over several shards, and how to read a record's id."""
    if kind == "llava_jsonl":
        paths, _ = id_records(tmp_path, folder, 3)
        with open(paths[1], "a") as file:
            file.write("{oops\n")
        return lambda: load_llava_json(paths, on_error="skip", streaming=True), answers
    if kind == "parquet":
        chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": f"r{i}"}] for i in range(12)]
        chats[5] = [{"role": "robot", "content": "Hi"}]
        rows = {"images": [[]] * 12, "messages": chats}
        features = datasets.Features({"images": datasets.List(datasets.Value("string")), "messages": datasets.Json()})
        table = datasets.Dataset.from_dict(rows, features=features)
        for part in range(2):
            table.select(range(part, 12, 2)).to_parquet(str(tmp_path / f"part-{part}.parquet"))
        files = [str(tmp_path / f"part-{part}.parquet") for part in range(2)]
        return lambda: load_hub_dataset("parquet", data_files=files, on_error="skip", streaming=True), answers
    if kind == "save_to_disk":
        replies = [{"role": "assistant", "content": [text(f"r{i}")]} for i in range(12)]
        rows = {"images": [[]] * 12, "messages": [HUB_MESSAGES[2][:1] + [reply] for reply in replies]}
        datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "saved")
        return lambda: load_hub_dataset(str(tmp_path / "saved"), num_shards=5, streaming=True), answers
    if kind == "webdataset":
        image = (folder / "a.png").read_bytes()
        samples = [(f"k{i}", {"png": image, "txt": f"r{i}".encode()}) for i in range(12)]
        samples[7] = ("k7", {"txt": b"no image"})
        paths = [write_tar(tmp_path / f"shard-{part}.tar", samples[part * 4 : part * 4 + 4]) for part in range(3)]
        columns = {"image": "png", "caption": "txt"}
        return lambda: load_webdataset(paths, columns, on_error="skip", streaming=True), lambda records: [
            record["caption"] for record in records
        ]
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["llava_jsonl", "parquet", "save_to_disk", "webdataset"])
@pytest.mark.parametrize("taken", [1, 5, 11])
def test_a_stream_state_resumes_at_the_next_record(tmp_path, folder, kind, taken):
    open_stream, ids = resumable(kind, tmp_path, folder)
    everything = ids(open_stream())
    stream = open_stream()
    head = ids(itertools.islice(iter(stream), taken))
    state = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint holds
    resumed = open_stream()
    resumed.load_state_dict(state)
    assert head + ids(resumed) == everything and len(everything) in (11, 12)


@pytest.mark.parametrize("accumulation, save_steps, saved_at", [(1, 3, (3, 6)), (2, 1, (2, 3))])
def test_a_resumed_trainer_collates_only_what_it_did_not_train_on(
    tmp_path, folder, accumulation, save_steps, saved_at
):
    """Six records in six files, one a micro-batch: a pass ends after six. Resumed mid-pass and at the end of the pass
    (where the next pass reads the files in another order), the Trainer collates exactly the records the
    uninterrupted run collated after the checkpoint, and none before it."""
    paths, ids = id_records(tmp_path, folder, 6, count=6)
    processor = tiny_processor()
    options = dict(
        save_strategy="steps",
        save_steps=save_steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=accumulation,
        seed=1,
    )

    def run(out_dir, resume=None) -> list[str]:
        stream = load_llava_json(paths, streaming=True)
        return train(stream, out_dir, processor, 8 // accumulation, resume, **options)

    straight = run(tmp_path / "straight")
    assert sorted(straight[:6]) == sorted(ids) and len(straight) == 9  # 8 batches and the one read ahead
    assert straight[6:] != straight[:3]  # the second pass reads the files in another order
    for step in saved_at:
        checkpoint = tmp_path / "straight" / f"checkpoint-{step}"
        trained = step * accumulation
        saved = json.loads((checkpoint / STREAM_STATE_FILE.format(rank=0)).read_text())
        assert saved["pass_complete"] == (trained == 6)
        assert run(tmp_path / f"resumed-{step}", str(checkpoint)) == straight[trained:]


def test_a_resumed_stream_needs_its_state_and_the_settings(tmp_path, folder):
    paths, _ = id_records(tmp_path, folder, 2, count=4)
    processor = tiny_processor()
    stream = load_llava_json(paths, streaming=True)
    with pytest.raises(ValueError, match=r"ignore_data_skip=True"):
        train(stream, tmp_path / "a", processor, 1, ignore_data_skip=False)
    # TRL's SFTTrainer turns batch dispatching off for a stream; the stage-2 Trainer leaves accelerate's default on.
    stage_two = trainer_for(
        tiny_setokim(processor), processor, stream, tmp_path / "b", max_steps=1, ignore_data_skip=True
    )
    stage_two.add_callback(StreamStateCallback())
    with pytest.raises(ValueError, match=r"dispatch_batches': False"):
        stage_two.train()
    train(stream, tmp_path / "c", processor, 2, save_strategy="steps", save_steps=1)
    os.remove(tmp_path / "c" / "checkpoint-1" / STREAM_STATE_FILE.format(rank=0))
    with pytest.raises(FileNotFoundError, match="stream_state_rank0.json does not exist"):
        train(stream, tmp_path / "d", processor, 2, str(tmp_path / "c" / "checkpoint-1"))
    state_file = tmp_path / "c" / "checkpoint-2" / STREAM_STATE_FILE.format(rank=0)
    state_file.write_text(json.dumps(dict(json.loads(state_file.read_text()), world_size=2)))
    with pytest.raises(ValueError, match="saved by 2 processes"):
        train(stream, tmp_path / "e", processor, 3, str(tmp_path / "c" / "checkpoint-2"))


# --------------------------------------------------------------------------------------------------------------------
# Two processes


def test_every_source_trains_under_two_process_ddp_on_disjoint_records(tmp_path):
    """One `accelerate launch` (two CPU processes, gloo) trains on each kind of stream in turn: the processes collate
    disjoint records of every source (shards for those with a shard per process, records for the one-file source),
    `split_for_process` splits with torch.distributed's rank, and a run resumed from its checkpoint on both
    processes collates exactly what the uninterrupted run collated after it."""
    build_sources(tmp_path / "data")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    command += [str(TESTS / "streaming_ddp_script.py"), str(tmp_path / "data"), str(tmp_path / "out")]
    start = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"two-process launch: {time.monotonic() - start:.1f} s")

    ranks = [json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(report["rank"], report["world_size"]) for report in ranks] == [(0, 2), (1, 2)]
    for source in SOURCES:
        seen = [report["trained"][source] for report in ranks]
        assert all(len(ids) >= STEPS * 2 and len(set(ids)) == len(ids) for ids in seen), (source, seen)
        assert not set(seen[0]) & set(seen[1]), f"{source}: both processes trained on {set(seen[0]) & set(seen[1])}"
        assert set(seen[0]) | set(seen[1]) <= set(record_ids(source))
    for report in ranks:
        assert report["resumed"] == report["straight"][4:], RESUMED  # two steps of two records trained before
    for source, parts in ((s, [report["split"][s] for report in ranks]) for s in ("llava", "webdataset")):
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(record_ids(source))


def test_the_datasets_internal_that_reads_a_streams_columns_is_still_there():
    """`resolve_stream_features` wraps datasets' `IterableDataset._resolve_features`: this fails loudly when a
    datasets release moves it, before any stream without declared features loses its columns."""
    from transformers_setok.training.streaming import resolve_stream_features

    assert callable(getattr(datasets.IterableDataset, "_resolve_features", None))

    def rows():
        for i in range(3):
            yield {"id": i, "text": f"row {i}"}

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.features is None and stream.column_names is None
    resolved = resolve_stream_features(stream)
    assert resolved.column_names == ["id", "text"]
    assert [row["id"] for row in resolved] == [0, 1, 2]
