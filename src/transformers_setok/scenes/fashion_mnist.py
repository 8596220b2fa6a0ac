"""Fashion-MNIST scenes: 2-4 clothing items on a black canvas, each with its mask and a referring expression.

The images come from the Debian package `dataset-fashion-mnist` (`DATA_DIR`, four gzipped idx files; `read_idx` and
`load_split` are the one reader of them in the project). Train scenes draw their items from the `train` split,
held-out scenes from `t10k`, so no held-out item was ever seen in training.

A scene (`Scene`) is its items (`SceneItem`: which image of which split, its class, where it sits), so it can be
composed again with items removed, replaced or added (`compose`): the editing data and the benchmark reuse the scenes
this way. Everything is deterministic: scene `n` of `build_scenes(..., seed=s)` depends on `(s, n)` and the split
only, not on how many scenes are built.

* Canvas: `CANVAS_SIZE` = 112 px square, four times an item's 28 px side: four items fit anywhere without touching
  in most random draws, and 112 px stays cheap for a CPU model (with 8 px patches, a 14 x 14 grid, an item about
  3.5 patches across).
* Placement: each item's 28 x 28 box is put at a random position, at least `GAP` px from every other box (boxes do
  not overlap, so neither do items, and every item is whole on the canvas).
* Masks: an item's mask is its own pixels brighter than `ITEM_THRESHOLD` (10 of 255); dimmer pixels (the faint
  noise around many Fashion-MNIST items) are cleared when the item is drawn, so the canvas's non-black pixels are
  exactly the union of the masks, and each item's mask is exactly its non-black pixels.
* Expressions: an item whose class is unique in the scene is "the {class}" ("the bag"); an item of a repeated class
  is named by position, "the item on the left" ("... on the right", "... at the top", "... at the bottom"), when its box lies wholly on that side of
  every other item's box (so the phrase is unambiguous); an item with neither gets no expression. To have repeated
  classes often enough to teach positions, a scene repeats a class with probability `repeat_probability`.

Edits (`SceneEdit`, `scene_edits`, `train_edits` / `heldout_edits`) turn a scene into image-editing triplets whose
targets are composed from the same items: "remove X" (the target without the item), "replace X with Y" (another
image, of class Y, from the same split, in X's box) and "add Y on the right" (a new item whose box lies wholly right
of every other box, only where the canvas has room). X is named by its referring expression above, so the
instruction picks exactly one item; Y is a class named with its article ("a sneaker", "a pair of trousers"). The
edited region (`SceneEdit.mask`) is the removed and the added item's drawn pixels, the only pixels that can change.
`edit_records` gives them in the loaders' format (`training.data.EDITING_FEATURES`).
"""

import gzip
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image

from ..training.masks import encode_rle

__all__ = [
    "CANVAS_SIZE",
    "CLASSES",
    "CLASS_PHRASES",
    "DATA_DIR",
    "EDIT_KINDS",
    "INDEFINITE_PHRASES",
    "ITEM_THRESHOLD",
    "POSITIONS",
    "POSITION_PHRASES",
    "Scene",
    "SceneEdit",
    "SceneItem",
    "build_scenes",
    "compose",
    "edit_dataset",
    "edit_records",
    "heldout_edits",
    "heldout_scenes",
    "load_split",
    "read_idx",
    "scene_dataset",
    "scene_edits",
    "scene_records",
    "train_edits",
    "train_scenes",
]

DATA_DIR = "/usr/share/datasets/fashion-mnist"  # where the Debian package `dataset-fashion-mnist` puts it
SPLITS = ("train", "t10k")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASS_PHRASES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
ITEM_SIZE = 28
CANVAS_SIZE = 112
ITEM_THRESHOLD = 10  # a pixel is the item's when its grey level is above this (of 255)
GAP = 2  # px kept free between two items' boxes
POSITIONS = ("left", "right", "top", "bottom")
POSITION_PHRASES = {
    "left": "the item on the left",
    "right": "the item on the right",
    "top": "the item at the top",
    "bottom": "the item at the bottom",
}
_PLACEMENT_TRIES = 1000
EDIT_KINDS = ("remove", "replace", "add")
# A class as the thing to draw ("replace the bag with a sneaker"): trousers come in pairs.
INDEFINITE_PHRASES = (
    "a t-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)


# --- The idx files ---


def read_idx(path) -> np.ndarray:
    """A gzipped idx file: two zero bytes, a type byte (0x08: uint8), the number of dimensions, then one big-endian
    uint32 per dimension, then the data."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise ValueError(f"{path}: not an idx file (it must start with two zero bytes)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: expected uint8 data (type 0x08), got type {raw[2]:#x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of split `train` or `t10k` in `data_dir`."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"`data_dir`: no such folder: {folder} (Fashion-MNIST comes with `apt-get install dataset-fashion-mnist`)"
        )
    images = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{folder}: {split} holds images of shape {images.shape} and labels of shape {labels.shape}")
    return images, labels


# --- Scenes ---


@dataclass(frozen=True)
class SceneItem:
    """One item of a scene: image `index` of `split`, of class `label`, its 28 x 28 box's top-left corner at
    (`top`, `left`) on the canvas."""

    split: str
    index: int
    label: int
    top: int
    left: int

    @property
    def name(self) -> str:
        return CLASSES[self.label]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of its box, bottom/right exclusive."""
        return self.top, self.left, self.top + ITEM_SIZE, self.left + ITEM_SIZE

    def pixels(self, images: np.ndarray) -> np.ndarray:
        """The item as drawn, `(28, 28)` uint8: its image with the pixels at or below `ITEM_THRESHOLD` cleared."""
        image = images[self.index]
        return np.where(image > ITEM_THRESHOLD, image, 0).astype(np.uint8)


@dataclass(frozen=True)
class Scene:
    """A canvas of `canvas_size` px with `items`. The pixels are not held: the methods take the items' split's
    images (`load_split`), which keeps a scene a few numbers (cheap to store, edit and rebuild)."""

    items: tuple[SceneItem, ...]
    canvas_size: int = CANVAS_SIZE

    def image(self, images: np.ndarray) -> PIL.Image.Image:
        """The scene, a grey `canvas_size` x `canvas_size` PIL image."""
        return PIL.Image.fromarray(compose(self.items, images, self.canvas_size))

    def mask(self, number: int, images: np.ndarray) -> np.ndarray:
        """Item `number`'s mask, bool `(canvas_size, canvas_size)`: its own drawn pixels."""
        item = self.items[number]
        mask = np.zeros((self.canvas_size, self.canvas_size), dtype=bool)
        top, left, bottom, right = item.box
        mask[top:bottom, left:right] = item.pixels(images) > 0
        return mask

    def expressions(self) -> list[tuple[int, str]]:
        """(item number, referring expression) for every item that has an unambiguous one, in item order."""
        named = []
        for number, item in enumerate(self.items):
            if sum(other.label == item.label for other in self.items) == 1:
                named.append((number, f"the {CLASS_PHRASES[item.label]}"))
                continue
            for position in POSITIONS:
                if self.is_alone_on(number, position):
                    named.append((number, POSITION_PHRASES[position]))
                    break
        return named

    def is_alone_on(self, number: int, position: str) -> bool:
        """Whether item `number`'s box lies wholly on side `position` of every other item's box."""
        top, left, bottom, right = self.items[number].box
        for other_number, other in enumerate(self.items):
            if other_number == number:
                continue
            other_top, other_left, other_bottom, other_right = other.box
            beyond = {
                "left": right <= other_left,
                "right": left >= other_right,
                "top": bottom <= other_top,
                "bottom": top >= other_bottom,
            }[position]
            if not beyond:
                return False
        return True


def compose(items, images: np.ndarray, canvas_size: int = CANVAS_SIZE) -> np.ndarray:
    """`items` drawn on a black canvas, `(canvas_size, canvas_size)` uint8. Boxes may not overlap (an edit that
    adds an item must place it in free space, as `build_scenes` does)."""
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    taken = np.zeros_like(canvas, dtype=bool)
    for item in items:
        top, left, bottom, right = item.box
        if top < 0 or left < 0 or bottom > canvas_size or right > canvas_size:
            raise ValueError(f"{item} does not fit on a {canvas_size} px canvas.")
        if taken[top:bottom, left:right].any():
            raise ValueError(f"{item} overlaps another item's box.")
        taken[top:bottom, left:right] = True
        canvas[top:bottom, left:right] = item.pixels(images)
    return canvas


def build_scenes(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    *,
    split: str,
    seed: int = 0,
    min_items: int = 2,
    max_items: int = 4,
    canvas_size: int = CANVAS_SIZE,
    repeat_probability: float = 0.5,
) -> list[Scene]:
    """`count` scenes of `min_items`..`max_items` items from `images`/`labels` (one split, named `split`).

    Scene `n` is drawn from `numpy.random.default_rng((seed, n))`. Items are distinct images; with probability
    `repeat_probability` one class appears at least twice (its items are then named by position)."""
    if not 1 <= min_items <= max_items:
        raise ValueError(f"`min_items` and `max_items` must satisfy 1 <= min <= max, got {min_items}, {max_items}.")
    if canvas_size < ITEM_SIZE:
        raise ValueError(f"`canvas_size` must be at least {ITEM_SIZE}, got {canvas_size}.")
    by_class = _by_class(labels)
    return [
        _scene(
            images,
            by_class,
            np.random.default_rng((seed, number)),
            split,
            min_items,
            max_items,
            canvas_size,
            repeat_probability,
        )
        for number in range(count)
    ]


def _by_class(labels) -> dict[int, np.ndarray]:
    """Class -> the indices of its images, for the classes that have any."""
    labels = np.asarray(labels)
    by_class = {label: np.flatnonzero(labels == label) for label in range(len(CLASSES))}
    return {label: indices for label, indices in by_class.items() if len(indices)}


def _scene(images, by_class, rng, split, min_items, max_items, canvas_size, repeat_probability) -> Scene:
    size = int(rng.integers(min_items, max_items + 1))
    classes = sorted(by_class)
    chosen = [int(label) for label in rng.choice(classes, size=size, replace=len(classes) < size)]
    if size > 1 and rng.random() < repeat_probability:
        chosen[-1] = chosen[0]
    boxes = _place(size, canvas_size, rng)
    items, used = [], set()
    for label, (top, left) in zip(chosen, boxes):
        index = _pick(images, by_class[label], used, rng)
        used.add(index)
        items.append(SceneItem(split, index, label, top, left))
    return Scene(tuple(items), canvas_size)


def _place(count: int, canvas_size: int, rng) -> list[tuple[int, int]]:
    """`count` top-left corners of 28 px boxes at least `GAP` apart, by rejection."""
    for _ in range(_PLACEMENT_TRIES):
        corners = rng.integers(0, canvas_size - ITEM_SIZE + 1, size=(count, 2))
        apart = all(
            max(abs(int(a[0]) - int(b[0])), abs(int(a[1]) - int(b[1]))) >= ITEM_SIZE + GAP
            for i, a in enumerate(corners)
            for b in corners[i + 1 :]
        )
        if apart:
            return [(int(top), int(left)) for top, left in corners]
    raise ValueError(f"Cannot place {count} items of {ITEM_SIZE} px apart on a {canvas_size} px canvas.")


def _pick(images, candidates, used: set, rng) -> int:
    """A random image of `candidates` not used yet in the scene, with at least one pixel above the threshold."""
    for index in rng.permutation(candidates):
        if int(index) not in used and (images[index] > ITEM_THRESHOLD).any():
            return int(index)
    raise ValueError("No unused, non-blank image left for a class.")


def train_scenes(count: int, seed: int = 0, data_dir=DATA_DIR, **kwargs) -> tuple[list[Scene], np.ndarray]:
    """`count` scenes from the train split, and that split's images (what the scenes' items index)."""
    return _split_scenes("train", count, seed, data_dir, **kwargs)


def heldout_scenes(count: int, seed: int = 0, data_dir=DATA_DIR, **kwargs) -> tuple[list[Scene], np.ndarray]:
    """`count` scenes from the t10k split (never seen in training), and that split's images."""
    return _split_scenes("t10k", count, seed, data_dir, **kwargs)


def _split_scenes(split, count, seed, data_dir, **kwargs):
    images, labels = load_split(data_dir, split)
    return build_scenes(images, labels, count, split=split, seed=seed, **kwargs), images


# --- Records ---


def scene_records(scenes, images: np.ndarray) -> list[dict]:
    """One referring-segmentation record per (scene, expression), in the loaders' format (`training.data`:
    `SEGMENTATION_FEATURES`): {"images": [PIL image], "expression": str, "messages": None, "mask": RLE}."""
    records = []
    for scene in scenes:
        image = scene.image(images)
        for number, expression in scene.expressions():
            mask = encode_rle(scene.mask(number, images))
            records.append({"images": [image], "expression": expression, "messages": None, "mask": mask})
    return records


def scene_dataset(scenes, images: np.ndarray):
    """`scene_records` as a `datasets.Dataset` of `SEGMENTATION_FEATURES` (the images stored as PNG bytes)."""
    import datasets

    from ..training.data import SEGMENTATION_FEATURES

    return datasets.Dataset.from_list(scene_records(scenes, images), features=SEGMENTATION_FEATURES)


# --- Edits ---


@dataclass(frozen=True)
class SceneEdit:
    """Scene `source` edited by `instruction` (a `kind` of `EDIT_KINDS`): `removed` is the item taken out (None when
    one is only added), `added` the item put in (None for a removal); a replacement's `added` sits in `removed`'s
    box. Like a scene, an edit holds no pixels: its methods take the split's images."""

    kind: str
    instruction: str
    source: Scene
    removed: SceneItem | None
    added: SceneItem | None

    @property
    def target(self) -> Scene:
        """The scene after the edit: the same items, in the same order, the removed one replaced or gone, the added
        one last when nothing was removed."""
        items = [self.added if item == self.removed else item for item in self.source.items]
        if self.removed is None:
            items.append(self.added)
        return replace(self.source, items=tuple(item for item in items if item is not None))

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the edited box (bottom/right exclusive)."""
        return (self.removed or self.added).box

    @property
    def label(self) -> int | None:
        """The class the edited box holds after the edit; None when it is left empty."""
        return None if self.added is None else self.added.label

    def mask(self, images: np.ndarray) -> np.ndarray:
        """The edited region, bool `(canvas_size, canvas_size)`: the drawn pixels of the removed and the added item,
        the only pixels the edit can change."""
        size = self.source.canvas_size
        region = np.zeros((size, size), dtype=bool)
        for item in (self.removed, self.added):
            if item is not None:
                top, left, bottom, right = item.box
                region[top:bottom, left:right] |= item.pixels(images) > 0
        return region

    def record(self, images: np.ndarray) -> dict:
        """The edit as an editing record (`training.data.EDITING_FEATURES`)."""
        return {
            "images": [self.source.image(images), self.target.image(images)],
            "instruction": self.instruction,
            "edit_mask": encode_rle(self.mask(images)),
        }


def scene_edits(scenes, images: np.ndarray, labels: np.ndarray, *, seed: int = 0, kinds=EDIT_KINDS) -> list[SceneEdit]:
    """Up to one edit of each kind in `kinds` per scene, scene by scene, kinds in `EDIT_KINDS` order. `images` and
    `labels` are the scenes' split (`load_split`): replacements and additions are drawn from it.

    The edit of kind `k` of scene `n` is drawn from `numpy.random.default_rng((seed, n, EDIT_KINDS.index(k)))`, so it
    does not depend on how many scenes or which other kinds are asked for. A scene gets no removal or replacement
    when none of its items has a referring expression, and no addition when the canvas has no room on the right."""
    unknown = [kind for kind in kinds if kind not in EDIT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"`kinds` must be some of {EDIT_KINDS}, got {list(kinds)!r}.")
    by_class = _by_class(labels)
    make = {"remove": _removal, "replace": _replacement, "add": _addition}
    edits = []
    for number, scene in enumerate(scenes):
        for kind in (kind for kind in EDIT_KINDS if kind in kinds):
            rng = np.random.default_rng((seed, number, EDIT_KINDS.index(kind)))
            edit = make[kind](scene, images, by_class, rng)
            if edit is not None:
                edits.append(edit)
    return edits


def _named_item(scene: Scene, rng) -> tuple[SceneItem, str] | None:
    """A random item of those with a referring expression, and the expression."""
    named = scene.expressions()
    if not named:
        return None
    number, expression = named[int(rng.integers(len(named)))]
    return scene.items[number], expression


def _removal(scene, images, by_class, rng) -> SceneEdit | None:
    chosen = _named_item(scene, rng)
    if chosen is None:
        return None
    item, expression = chosen
    return SceneEdit("remove", f"remove {expression}", scene, removed=item, added=None)


def _replacement(scene, images, by_class, rng) -> SceneEdit | None:
    chosen = _named_item(scene, rng)
    others = None if chosen is None else [label for label in sorted(by_class) if label != chosen[0].label]
    if not others:
        return None
    item, expression = chosen
    label = int(rng.choice(others))
    new = _new_item(scene, images, by_class, label, item.top, item.left, rng)
    return SceneEdit("replace", f"replace {expression} with {INDEFINITE_PHRASES[label]}", scene, item, new)


def _addition(scene, images, by_class, rng) -> SceneEdit | None:
    if not scene.items:
        return None  # "on the right" of nothing means nothing
    start = max(item.box[3] for item in scene.items) + GAP  # wholly right of every box, GAP px clear
    if start + ITEM_SIZE > scene.canvas_size:
        return None
    label = int(rng.choice(sorted(by_class)))
    top = int(rng.integers(0, scene.canvas_size - ITEM_SIZE + 1))
    left = int(rng.integers(start, scene.canvas_size - ITEM_SIZE + 1))
    new = _new_item(scene, images, by_class, label, top, left, rng)
    return SceneEdit("add", f"add {INDEFINITE_PHRASES[label]} on the right", scene, None, new)


def _new_item(scene: Scene, images, by_class, label: int, top: int, left: int, rng) -> SceneItem:
    """An item of class `label` at (`top`, `left`): an image of the scene's split not in the scene yet."""
    split = scene.items[0].split
    used = {item.index for item in scene.items}
    return SceneItem(split, _pick(images, by_class[label], used, rng), label, top, left)


def train_edits(count: int, seed: int = 0, data_dir=DATA_DIR, kinds=EDIT_KINDS, **kwargs):
    """The edits (`scene_edits`) of `train_scenes(count, seed, data_dir, **kwargs)`, and the train split's images."""
    return _split_edits("train", count, seed, data_dir, kinds, **kwargs)


def heldout_edits(count: int, seed: int = 0, data_dir=DATA_DIR, kinds=EDIT_KINDS, **kwargs):
    """The edits of `heldout_scenes(count, seed, data_dir, **kwargs)`: scenes, replacements and additions all from
    t10k, never seen in training. Returns them and t10k's images."""
    return _split_edits("t10k", count, seed, data_dir, kinds, **kwargs)


def _split_edits(split, count, seed, data_dir, kinds, **kwargs):
    images, labels = load_split(data_dir, split)
    scenes = build_scenes(images, labels, count, split=split, seed=seed, **kwargs)
    return scene_edits(scenes, images, labels, seed=seed, kinds=kinds), images


def edit_records(edits, images: np.ndarray) -> list[dict]:
    """One editing record per edit (`SceneEdit.record`): {"images": [source, target], "instruction": str,
    "edit_mask": RLE}."""
    return [edit.record(images) for edit in edits]


def edit_dataset(edits, images: np.ndarray):
    """`edit_records` as a `datasets.Dataset` of `EDITING_FEATURES` (the images stored as PNG bytes)."""
    import datasets

    from ..training.data import EDITING_FEATURES

    return datasets.Dataset.from_list(edit_records(edits, images), features=EDITING_FEATURES)
