"""Referring-segmentation loaders: RefCOCO's refs pickle + COCO instances layout, JSONL files and HF datasets, on
tiny files written here with a real photo (scikit-image's astronaut) and a real shape (its horse silhouette)."""

import json
import logging
import pickle

import datasets
import numpy as np
import PIL.Image
import pytest

from transformers_setok.training.data import (
    SEGMENTATION_FEATURES,
    DataValidationError,
    load_refcoco,
    load_segmentation_dataset,
    load_segmentation_jsonl,
)
from transformers_setok.training.masks import decode_mask, encode_rle

HEIGHT, WIDTH = 328, 400  # the horse silhouette's size; the photo is resized to it


@pytest.fixture(scope="module")
def horse() -> np.ndarray:
    from skimage import data

    return ~data.horse()  # a black horse on white: inverted, the horse is True


@pytest.fixture
def photo(tmp_path) -> str:
    from skimage import data

    (tmp_path / "images").mkdir()
    PIL.Image.fromarray(data.astronaut()).resize((WIDTH, HEIGHT)).save(tmp_path / "images" / "photo.jpg")
    return "photo.jpg"


def uncompressed_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1)
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    return ([0] if flat[0] else []) + np.diff(bounds).tolist()


SQUARE = [[10, 20, 60, 20, 60, 70, 10, 70]]  # polygon: x 10..60, y 20..70


def square_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[20:71, 10:61] = True
    return mask


def write_refcoco(folder, horse, refs=None, annotations=None, images=None):
    images = images or [{"id": 7, "file_name": "photo.jpg", "height": HEIGHT, "width": WIDTH}]
    annotations = annotations or [
        {"id": 100, "image_id": 7, "segmentation": {"size": [HEIGHT, WIDTH], "counts": uncompressed_counts(horse)}},
        {"id": 101, "image_id": 7, "segmentation": SQUARE},
        {"id": 102, "image_id": 7, "segmentation": encode_rle(horse)},
    ]
    refs = refs or [
        ref(0, 100, "train", "the horse", "a black horse"),
        ref(1, 101, "val", "the square"),
        ref(2, 101, "train", "the square on the top left"),
        ref(3, 102, "train", "the animal"),
    ]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    with open(folder / "refs(unc).p", "wb") as file:
        pickle.dump(refs, file, protocol=2)
    return folder / "refs(unc).p", folder / "instances.json", folder / "images"


def ref(ref_id, ann_id, split, *sentences, image_id=7):
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "sentences": [{"sent": sentence, "raw": sentence, "tokens": sentence.split()} for sentence in sentences],
    }


def test_refcoco_one_record_per_ref_and_sentence(tmp_path, photo, horse):
    paths = write_refcoco(tmp_path, horse)
    train = load_refcoco(*paths, split="train")
    assert train.features == SEGMENTATION_FEATURES
    assert train["expression"] == ["the horse", "a black horse", "the square on the top left", "the animal"]
    assert train["messages"] == [None] * 4
    expected = [horse, horse, square_mask(), horse]  # uncompressed RLE, polygon and compressed RLE
    for record, mask in zip(train, expected):
        assert record["images"][0].size == (WIDTH, HEIGHT)
        np.testing.assert_array_equal(decode_mask(record["mask"]), mask)
    assert load_refcoco(*paths, split="val")["expression"] == ["the square"]


def test_refcoco_unknown_split(tmp_path, photo, horse):
    with pytest.raises(ValueError, match=r"no ref of split 'testA'.*\['train', 'val'\]"):
        load_refcoco(*write_refcoco(tmp_path, horse), split="testA")


def test_refcoco_bad_refs_are_named_and_skipped(tmp_path, photo, horse, caplog):
    annotations = [
        {"id": 100, "image_id": 7, "segmentation": encode_rle(horse)},
        {"id": 101, "image_id": 7, "segmentation": {"size": [HEIGHT, WIDTH], "counts": [5, 5]}},
        {"id": 102, "image_id": 7, "segmentation": [[1, 2, 3]]},
        {"id": 103, "image_id": 7, "segmentation": {"size": [HEIGHT, WIDTH], "counts": [HEIGHT * WIDTH]}},
        {"id": 104, "image_id": 7, "segmentation": {"size": [10, 10], "counts": [50, 50]}},
    ]
    refs = [
        ref(0, 100, "train", "the horse"),
        ref(1, 101, "train", "bad counts"),
        ref(2, 102, "train", "odd polygon"),
        ref(3, 103, "train", "empty"),
        ref(4, 104, "train", "too small"),
        ref(5, 999, "train", "no annotation"),
        ref(6, 100, "train"),
    ]
    paths = write_refcoco(tmp_path, horse, refs=refs, annotations=annotations)
    with pytest.raises(
        DataValidationError, match=r"refs\(unc\)\.p, record 1 \(id '1'\): bad RLE: the counts sum to 10"
    ):
        load_refcoco(*paths)
    with caplog.at_level(logging.WARNING):
        kept = load_refcoco(*paths, on_error="skip")
    assert kept["expression"] == ["the horse"]
    summary = caplog.text
    assert "Skipped 6 of 7 records" in summary
    for expected in (
        "1 bad RLE (record 1 (id '1'))",
        "1 bad polygon (record 2 (id '2'))",
        "1 empty mask (record 3 (id '3'))",
        "1 mask size mismatch (record 4 (id '4'))",
        "1 unknown annotation (record 5 (id '5'))",
        "1 no sentences (record 6 (id '6'))",
    ):
        assert expected in summary


def test_refcoco_image_size_must_match_instances(tmp_path, photo, horse):
    images = [{"id": 7, "file_name": "photo.jpg", "height": HEIGHT + 1, "width": WIDTH}]
    with pytest.raises(DataValidationError, match="image size mismatch: instances.json gives photo.jpg as 329 x 400"):
        load_refcoco(*write_refcoco(tmp_path, horse, images=images))


def test_refcoco_pickle_that_would_run_code_is_refused(tmp_path, photo, horse):
    refs_path, instances, images = write_refcoco(tmp_path, horse)
    with open(refs_path, "wb") as file:
        pickle.dump([ref(0, 100, "train", "x"), PIL.Image.new("L", (1, 1))], file)
    with pytest.raises(DataValidationError, match="bad pickle: refs pickles hold plain values"):
        load_refcoco(refs_path, instances, images)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_jsonl_reads_png_polygon_and_rle_masks(tmp_path, photo, horse):
    PIL.Image.fromarray(horse).save(tmp_path / "images" / "horse.png")
    messages = [{"role": "user", "content": "Please segment the astronaut's flag."}]
    path = write_jsonl(
        tmp_path / "images" / "train.jsonl",
        [
            {"image": photo, "expression": "the horse", "mask": "horse.png"},
            {"image": photo, "expression": "the square", "mask": SQUARE},
            {
                "image": photo,
                "messages": messages,
                "mask": {"size": [HEIGHT, WIDTH], "counts": uncompressed_counts(horse)},
            },
        ],
    )
    records = load_segmentation_jsonl(path)
    assert records["expression"] == ["the horse", "the square", None]
    assert records[2]["messages"] == [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": messages[0]["content"]}],
        }
    ]
    for record, mask in zip(records, (horse, square_mask(), horse)):
        np.testing.assert_array_equal(decode_mask(record["mask"]), mask)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"expression": "x", "mask": SQUARE}, "line 1: malformed image field"),
        ({"image": "photo.jpg", "mask": SQUARE}, "line 1: no expression"),
        ({"image": "photo.jpg", "expression": "x"}, "line 1: missing mask"),
        ({"image": "photo.jpg", "expression": "x", "mask": "nope.png"}, "line 1: missing mask file"),
        ({"image": "photo.jpg", "expression": "x", "messages": [], "mask": SQUARE}, "not both"),
        ({"image": "photo.jpg", "expression": " ", "mask": SQUARE}, "malformed expression"),
        (
            {
                "image": "photo.jpg",
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                "mask": SQUARE,
            },
            "end with the user's request",
        ),
        ({"image": "photo.jpg", "expression": "x", "mask": [[1, 2, 3, 4, 5]]}, "bad polygon: polygon 0 has an odd"),
    ],
)
def test_jsonl_bad_records(tmp_path, photo, record, message):
    path = write_jsonl(tmp_path / "images" / "bad.jsonl", [record])
    with pytest.raises(DataValidationError, match=message):
        load_segmentation_jsonl(path)


def test_jsonl_mask_of_another_size(tmp_path, photo):
    PIL.Image.fromarray(np.ones((HEIGHT, WIDTH - 1), dtype=bool)).save(tmp_path / "images" / "small.png")
    good = {"image": photo, "expression": "x", "mask": SQUARE}
    path = write_jsonl(
        tmp_path / "images" / "a.jsonl", [good, {"image": photo, "expression": "y", "mask": "small.png"}]
    )
    with pytest.raises(DataValidationError, match=r"a.jsonl, line 2: mask size mismatch: the mask is 328 x 399"):
        load_segmentation_jsonl(path)
    assert load_segmentation_jsonl(path, on_error="skip")["expression"] == ["x"]


def test_hf_dataset_with_image_features_and_every_mask_form(tmp_path, photo, horse):
    image = PIL.Image.open(tmp_path / "images" / photo)
    mask_png = PIL.Image.fromarray(horse.astype(np.uint8) * 255)
    features = datasets.Features(
        {"image": datasets.Image(), "expression": datasets.Value("string"), "mask": datasets.Image()}
    )
    table = datasets.Dataset.from_dict(
        {"image": [image, image], "expression": ["the horse", "the other horse"], "mask": [mask_png, mask_png]},
        features=features,
    )
    records = load_segmentation_dataset(table)
    assert records.features == SEGMENTATION_FEATURES and len(records) == 2
    np.testing.assert_array_equal(decode_mask(records[1]["mask"]), horse)
    assert records[0]["images"][0].size == (WIDTH, HEIGHT)

    table.save_to_disk(tmp_path / "saved")
    assert load_segmentation_dataset(str(tmp_path / "saved"))["expression"] == ["the horse", "the other horse"]

    rle = datasets.Dataset.from_dict(
        {"image": [image], "expression": ["the horse"], "mask": [encode_rle(horse)]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "expression": datasets.Value("string"),
                "mask": {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")},
            }
        ),
    )
    np.testing.assert_array_equal(decode_mask(load_segmentation_dataset(rle)[0]["mask"]), horse)


def test_hf_dataset_bad_rows_are_named_by_index(tmp_path, photo, horse, caplog):
    image = PIL.Image.open(tmp_path / "images" / photo)
    empty = PIL.Image.fromarray(np.zeros((HEIGHT, WIDTH), dtype=np.uint8))
    grey = PIL.Image.fromarray(np.full((HEIGHT, WIDTH), 128, dtype=np.uint8))
    table = datasets.Dataset.from_dict(
        {
            "image": [image, image, image],
            "expression": ["good", "empty", "grey"],
            "mask": [PIL.Image.fromarray(horse), empty, grey],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "expression": datasets.Value("string"), "mask": datasets.Image()}
        ),
    )
    with pytest.raises(DataValidationError, match="the dataset, record 1: empty mask"):
        load_segmentation_dataset(table)
    with caplog.at_level(logging.WARNING):
        assert load_segmentation_dataset(table, on_error="skip")["expression"] == ["good"]
    assert "1 empty mask (record 1); 1 bad mask values (record 2)" in caplog.text


def test_hf_dataset_needs_its_columns(photo):
    table = datasets.Dataset.from_dict({"image": ["a.png"], "mask": [None]})
    with pytest.raises(ValueError, match="neither an 'expression' nor a 'messages' column"):
        load_segmentation_dataset(table)
    with pytest.raises(ValueError, match="no 'segmentation' column .`mask_column`."):
        load_segmentation_dataset(table.add_column("expression", ["x"]), mask_column="segmentation")
