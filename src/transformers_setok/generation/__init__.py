"""What training and sampling of the generation head share: its noise schedule and MAR's unmasking schedule."""

from .schedule import noise_scheduler_for, revealed_counts

__all__ = ["noise_scheduler_for", "revealed_counts"]
