"""Deprecated path: the demo's photos are `transformers_setok.demo.photos`."""

from .._deprecation import warn_moved
from ..demo.photos import HELD_OUT_PHOTOS, AugmentedCrops, load_photos

warn_moved(__name__, "transformers_setok.demo.photos")

__all__ = ["HELD_OUT_PHOTOS", "AugmentedCrops", "load_photos"]
