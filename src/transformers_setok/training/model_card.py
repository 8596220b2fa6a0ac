"""Deprecated path: model cards are `transformers_setok.hub.model_card`."""

from .._deprecation import warn_moved
from ..hub.model_card import render_setok_card, render_setokim_card, supported_transformers

warn_moved(__name__, "transformers_setok.hub.model_card")

__all__ = ["render_setok_card", "render_setokim_card", "supported_transformers"]
