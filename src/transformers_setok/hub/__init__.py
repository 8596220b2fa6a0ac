"""Publishing: self-contained Hub folders (weights, remote code, processor) and their model cards."""

from .export import export_setokim, push_folder_to_hub
from .model_card import render_setok_card, render_setokim_card, supported_transformers

__all__ = [
    "export_setokim",
    "push_folder_to_hub",
    "render_setok_card",
    "render_setokim_card",
    "supported_transformers",
]
