from .image_processing_setok import SetokImageProcessor

__all__ = ["SetokImageProcessor"]
