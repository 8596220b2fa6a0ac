from .image_processing_setok import SetokImageProcessor, SetokImagesKwargs
from .processing_setokim import SetokimProcessor

__all__ = ["SetokImageProcessor", "SetokImagesKwargs", "SetokimProcessor"]
