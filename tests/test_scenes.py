"""Fashion-MNIST scenes (`transformers_setok.scenes`): items on a canvas with masks from their own pixels and
unambiguous referring expressions, deterministic, held-out scenes from t10k; their edits change only the edited
region and name what they edit unambiguously. The idx files are written here in
Fashion-MNIST's format from real 28 x 28 images (scikit-learn's digits, scaled up), as the Debian package cannot be
pip-installed; train and t10k hold different images so that the split used can be told apart."""

import gzip
import struct

import numpy as np
import PIL.Image
import pytest

from transformers_setok.scenes import (
    CANVAS_SIZE,
    CLASS_PHRASES,
    EDIT_KINDS,
    INDEFINITE_PHRASES,
    ITEM_THRESHOLD,
    POSITION_PHRASES,
    Scene,
    SceneEdit,
    SceneItem,
    build_scenes,
    compose,
    edit_dataset,
    heldout_edits,
    heldout_scenes,
    load_split,
    read_idx,
    scene_dataset,
    scene_edits,
    scene_records,
    train_edits,
    train_scenes,
)
from transformers_setok.training.data import EDITING_FEATURES, SEGMENTATION_FEATURES
from transformers_setok.training.masks import decode_mask


def write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * 15).astype(np.uint8)
    images = np.stack([np.asarray(PIL.Image.fromarray(image).resize((28, 28))) for image in grey])
    folder = tmp_path_factory.mktemp("fashion-mnist")
    for split, rows in (("train", slice(0, 1200)), ("t10k", slice(1200, 1500))):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[rows])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", digits.target[rows])
    return folder


@pytest.fixture(scope="module")
def scenes(data_dir):
    return train_scenes(60, seed=3, data_dir=data_dir)


def test_read_idx_and_load_split(data_dir, tmp_path):
    images, labels = load_split(data_dir, "t10k")
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8 and labels.shape == (300,)
    write_idx(tmp_path / "short.gz", np.zeros((2, 3)))
    with gzip.open(tmp_path / "short.gz", "rb") as file:
        raw = file.read()
    with gzip.open(tmp_path / "cut.gz", "wb") as file:
        file.write(raw[:-1])
    with pytest.raises(ValueError, match=r"17 bytes, but its header \(2, 3\) needs 18"):
        read_idx(tmp_path / "cut.gz")
    with pytest.raises(ValueError, match="`split` must be one of"):
        load_split(data_dir, "test")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_split(tmp_path / "nowhere", "train")


def test_scenes_have_two_to_four_separate_whole_items(scenes):
    scenes, _ = scenes
    assert {len(scene.items) for scene in scenes} == {2, 3, 4}
    for scene in scenes:
        for number, item in enumerate(scene.items):
            top, left, bottom, right = item.box
            assert 0 <= top and 0 <= left and bottom <= CANVAS_SIZE and right <= CANVAS_SIZE
            for other in scene.items[number + 1 :]:
                other_top, other_left, other_bottom, other_right = other.box
                assert bottom <= other_top or other_bottom <= top or right <= other_left or other_right <= left


def test_masks_are_the_items_own_pixels(scenes):
    scenes, images = scenes
    for scene in scenes:
        canvas = np.asarray(scene.image(images))
        assert canvas.shape == (CANVAS_SIZE, CANVAS_SIZE)
        union = np.zeros(canvas.shape, dtype=bool)
        for number, item in enumerate(scene.items):
            mask = scene.mask(number, images)
            top, left, bottom, right = item.box
            expected = np.zeros_like(mask)
            expected[top:bottom, left:right] = images[item.index] > ITEM_THRESHOLD  # the source image, not the canvas
            np.testing.assert_array_equal(mask, expected)
            np.testing.assert_array_equal(canvas[mask], images[item.index][images[item.index] > ITEM_THRESHOLD])
            assert mask.any() and not (union & mask).any()
            union |= mask
        np.testing.assert_array_equal(canvas > 0, union)  # nothing drawn outside the masks


def refers_to(scene, expression: str) -> list[int]:
    """The items `expression` can mean, read from the items' classes and boxes (independently of the builder)."""
    if expression in POSITION_PHRASES.values():
        side = next(side for side, phrase in POSITION_PHRASES.items() if phrase == expression)
        matches = []
        for number, item in enumerate(scene.items):
            top, left, bottom, right = item.box
            others = [other.box for other_number, other in enumerate(scene.items) if other_number != number]
            beyond = {
                "left": all(right <= box[1] for box in others),
                "right": all(left >= box[3] for box in others),
                "top": all(bottom <= box[0] for box in others),
                "bottom": all(top >= box[2] for box in others),
            }[side]
            matches += [number] if beyond else []
        return matches
    assert expression.startswith("the ")
    return [number for number, item in enumerate(scene.items) if CLASS_PHRASES[item.label] == expression[4:]]


def test_every_expression_picks_exactly_its_item(scenes):
    scenes, _ = scenes
    kinds = set()
    for scene in scenes:
        for number, expression in scene.expressions():
            assert refers_to(scene, expression) == [number], (scene, expression)
            kinds.add("position" if expression in POSITION_PHRASES.values() else "class")
            if expression not in POSITION_PHRASES.values():
                assert sum(item.label == scene.items[number].label for item in scene.items) == 1
    assert kinds == {"class", "position"}


def test_repeated_classes_are_named_by_position_only():
    images = np.full((4, 28, 28), 200, dtype=np.uint8)
    bag = 8

    left, right = SceneItem("train", 0, bag, 10, 0), SceneItem("train", 1, bag, 10, 60)
    assert Scene((left, right)).expressions() == [(0, "the item on the left"), (1, "the item on the right")]
    # A t-shirt under the left bag: that bag is no longer wholly left of (nor above, ...) every other item, so it
    # has no unambiguous phrase and gets none; the right bag still has one, and the t-shirt its class.
    below = SceneItem("train", 2, 0, 60, 0)
    named = dict(Scene((left, right, below)).expressions())
    assert named == {1: "the item on the right", 2: "the t-shirt"}
    np.testing.assert_array_equal(compose((left,), images)[10:38, 0:28], images[0])


def test_deterministic_from_the_seed(data_dir, scenes):
    again, _ = train_scenes(60, seed=3, data_dir=data_dir)
    assert again == scenes[0]
    fewer, _ = train_scenes(5, seed=3, data_dir=data_dir)
    assert fewer == scenes[0][:5]  # scene n depends on (seed, n) only
    other, _ = train_scenes(60, seed=4, data_dir=data_dir)
    assert other != scenes[0]


def test_heldout_scenes_use_t10k(data_dir):
    heldout, images = heldout_scenes(20, seed=3, data_dir=data_dir)
    t10k, _ = load_split(data_dir, "t10k")
    np.testing.assert_array_equal(images, t10k)
    assert all(item.split == "t10k" and item.index < len(t10k) for scene in heldout for item in scene.items)
    train, _ = load_split(data_dir, "train")
    scene = heldout[0]
    canvas = np.asarray(scene.image(images))
    item = scene.items[0]
    top, left, bottom, right = item.box
    drawn = canvas[top:bottom, left:right]
    np.testing.assert_array_equal(drawn, np.where(t10k[item.index] > ITEM_THRESHOLD, t10k[item.index], 0))
    assert not np.array_equal(drawn, np.where(train[item.index] > ITEM_THRESHOLD, train[item.index], 0))


def test_records_are_loader_records(scenes):
    scenes, images = scenes
    records = scene_records(scenes[:10], images)
    assert len(records) == sum(len(scene.expressions()) for scene in scenes[:10])
    dataset = scene_dataset(scenes[:10], images)
    assert dataset.features == SEGMENTATION_FEATURES and len(dataset) == len(records)
    first_scene = scenes[0]
    number, expression = first_scene.expressions()[0]
    row = dataset[0]
    assert row["expression"] == expression and row["messages"] is None
    np.testing.assert_array_equal(decode_mask(row["mask"]), first_scene.mask(number, images))
    np.testing.assert_array_equal(np.asarray(row["images"][0]), np.asarray(first_scene.image(images)))


def test_bad_arguments(data_dir):
    images, labels = load_split(data_dir, "train")
    with pytest.raises(ValueError, match="min_items"):
        build_scenes(images, labels, 1, split="train", min_items=3, max_items=2)
    with pytest.raises(ValueError, match="Cannot place 4 items"):
        build_scenes(images, labels, 1, split="train", min_items=4, canvas_size=40)
    item = SceneItem("train", 0, 0, 100, 100)
    with pytest.raises(ValueError, match="does not fit"):
        compose((item,), images)
    with pytest.raises(ValueError, match="overlaps"):
        compose((SceneItem("train", 0, 0, 0, 0), SceneItem("train", 1, 0, 10, 10)), images)


# --- Edits ---


@pytest.fixture(scope="module")
def edits(data_dir):
    return train_edits(60, seed=3, data_dir=data_dir)


def test_every_kind_of_edit_is_made(edits, scenes):
    edits, _ = edits
    kinds = [edit.kind for edit in edits]
    assert set(kinds) == set(EDIT_KINDS)
    named = sum(bool(scene.expressions()) for scene in scenes[0])
    assert kinds.count("remove") == kinds.count("replace") == named  # one of each per scene with a named item
    assert [edit.source for edit in edits if edit.kind == "remove"] == [s for s in scenes[0] if s.expressions()]


def test_each_edit_changes_exactly_its_region(edits):
    edits, images = edits
    for edit in edits:
        source, target = (np.asarray(scene.image(images)) for scene in (edit.source, edit.target))
        region = edit.mask(images)
        changed = source != target
        np.testing.assert_array_equal(source[~region], target[~region])  # nothing outside the region moves
        assert region.any() and not (changed & ~region).any()
        top, left, bottom, right = edit.box
        inside_box = np.zeros_like(region)
        inside_box[top:bottom, left:right] = True
        assert not (region & ~inside_box).any()
        if edit.kind == "replace":
            # The old item's pixels and the new one's, both in the same box; a pixel of equal grey in both stays.
            drawn = [item.pixels(images) > 0 for item in (edit.removed, edit.added)]
            np.testing.assert_array_equal(region[top:bottom, left:right], drawn[0] | drawn[1])
        else:
            np.testing.assert_array_equal(changed, region)  # a removal clears every pixel of it, an addition draws


def test_targets_are_the_same_items_edited(edits):
    edits, images = edits
    for edit in edits:
        before, after = list(edit.source.items), list(edit.target.items)
        if edit.kind == "remove":
            assert edit.added is None and edit.label is None
            assert after == [item for item in before if item != edit.removed] and len(after) == len(before) - 1
        elif edit.kind == "replace":
            assert edit.added.label != edit.removed.label and edit.added.box == edit.removed.box
            assert edit.added.split == edit.removed.split and edit.added.index not in {i.index for i in before}
            assert after == [edit.added if item == edit.removed else item for item in before]
            assert edit.instruction.endswith(f" with {INDEFINITE_PHRASES[edit.added.label]}")
        else:
            assert edit.removed is None and after == before + [edit.added]
            assert edit.instruction == f"add {INDEFINITE_PHRASES[edit.added.label]} on the right"
        compose(edit.target.items, images)  # the target is a valid scene: boxes on the canvas, none overlapping


def test_instructions_are_unambiguous(edits):
    edits, _ = edits
    for edit in edits:
        if edit.kind == "add":
            # "on the right": the new box lies wholly right of every other, in the target.
            assert refers_to(edit.target, POSITION_PHRASES["right"]) == [len(edit.target.items) - 1]
            continue
        phrase = edit.instruction.removeprefix(f"{edit.kind} ").split(" with ")[0]
        assert refers_to(edit.source, phrase) == [edit.source.items.index(edit.removed)], edit.instruction


def test_additions_only_where_there_is_room():
    images, labels = np.full((20, 28, 28), 200, dtype=np.uint8), np.arange(20) % 10
    crowded = Scene((SceneItem("train", 0, 0, 0, 0), SceneItem("train", 1, 1, 40, 60)))  # right edge at 88 > 82
    roomy = Scene((SceneItem("train", 0, 0, 0, 0), SceneItem("train", 1, 1, 40, 30)))  # right edge at 58
    edits = scene_edits([crowded, roomy], images, labels, kinds=("add",))
    assert [edit.source for edit in edits] == [roomy]
    assert edits[0].added.left >= 58 + 2 and edits[0].added.box[3] <= CANVAS_SIZE
    with pytest.raises(ValueError, match="`kinds` must be some of"):
        scene_edits([roomy], images, labels, kinds=("recolour",))


def test_edits_are_deterministic_from_the_seed(data_dir, edits):
    again, _ = train_edits(60, seed=3, data_dir=data_dir)
    assert again == edits[0]
    fewer, _ = train_edits(10, seed=3, data_dir=data_dir)
    assert fewer == [edit for edit in edits[0] if edit.source in fewer_sources(edits[0], 10)]
    removals, _ = train_edits(60, seed=3, data_dir=data_dir, kinds=("remove",))
    assert removals == [edit for edit in edits[0] if edit.kind == "remove"]  # a kind does not depend on the others
    assert train_edits(60, seed=4, data_dir=data_dir)[0] != edits[0]


def fewer_sources(edits, count: int) -> list:
    """The first `count` distinct source scenes of `edits`, in order (scene by scene)."""
    return list(dict.fromkeys(edit.source for edit in edits))[:count]


def test_heldout_edits_use_t10k_only(data_dir):
    edits, images = heldout_edits(30, seed=3, data_dir=data_dir)
    t10k, _ = load_split(data_dir, "t10k")
    np.testing.assert_array_equal(images, t10k)
    assert edits and {edit.kind for edit in edits} <= set(EDIT_KINDS)
    items = [item for edit in edits for item in (*edit.source.items, *edit.target.items)]
    assert {item.split for item in items} == {"t10k"}


def test_edit_records_are_loader_records(edits):
    edits, images = edits
    dataset = edit_dataset(edits[:6], images)
    assert dataset.features == EDITING_FEATURES and len(dataset) == 6
    row, edit = dataset[0], edits[0]
    assert row["instruction"] == edit.instruction
    np.testing.assert_array_equal(np.asarray(row["images"][0]), np.asarray(edit.source.image(images)))
    np.testing.assert_array_equal(np.asarray(row["images"][1]), np.asarray(edit.target.image(images)))
    np.testing.assert_array_equal(decode_mask(row["edit_mask"]), edit.mask(images))
    assert isinstance(edit, SceneEdit)
