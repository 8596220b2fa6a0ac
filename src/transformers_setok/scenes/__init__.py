"""Synthetic scenes built from real images, for referring segmentation (and, reusing the same scenes, editing and
benchmarks): `fashion_mnist` composes Fashion-MNIST items on a canvas with their masks and referring expressions."""

from .fashion_mnist import (
    CANVAS_SIZE,
    CLASS_PHRASES,
    CLASSES,
    DATA_DIR,
    ITEM_THRESHOLD,
    POSITION_PHRASES,
    POSITIONS,
    Scene,
    SceneItem,
    build_scenes,
    compose,
    heldout_scenes,
    load_split,
    read_idx,
    scene_dataset,
    scene_records,
    train_scenes,
)

__all__ = [
    "CANVAS_SIZE",
    "CLASSES",
    "CLASS_PHRASES",
    "DATA_DIR",
    "ITEM_THRESHOLD",
    "POSITIONS",
    "POSITION_PHRASES",
    "Scene",
    "SceneItem",
    "build_scenes",
    "compose",
    "heldout_scenes",
    "load_split",
    "read_idx",
    "scene_dataset",
    "scene_records",
    "train_scenes",
]
