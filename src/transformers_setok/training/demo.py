"""Deprecated path: the demo is `transformers_setok.demo`."""

from .._deprecation import warn_moved
from ..demo.demo import run_demo

warn_moved(__name__, "transformers_setok.demo")

__all__ = ["run_demo"]
