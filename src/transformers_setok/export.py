"""Deprecated path: export and push are `transformers_setok.hub`."""

from ._deprecation import warn_moved
from .hub.export import export_setokim, push_folder_to_hub

warn_moved(__name__, "transformers_setok.hub")

__all__ = ["export_setokim", "push_folder_to_hub"]
