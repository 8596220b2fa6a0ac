"""`setok demo`: a small SeTok trained on the photos that ship with scikit-image, scikit-learn and matplotlib."""

from .demo import run_demo

__all__ = ["run_demo"]
