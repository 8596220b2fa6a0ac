"""SeTok and Setokim as native Hugging Face Transformers models.

Importing the package registers the classes with the Auto API (`AutoConfig`, `AutoModel`, `AutoImageProcessor`,
`AutoModelForImageTextToText`, `AutoProcessor`).
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .assembly import add_generation_head, add_mask_decoder, build_setokim
from .modeling import (
    SetokConfig,
    SetokForImageReconstruction,
    SetokimConfig,
    SetokimDiffusionHead,
    SetokimForConditionalGeneration,
    SetokimModel,
    SetokimPreTrainedModel,
    SetokModel,
    SetokModelOutput,
    SetokPreTrainedModel,
    SetokReconstructionOutput,
    dpc_knn_cluster,
    iterative_cluster,
    sincos_position_embedding_2d,
)
from .processing import SetokImageProcessor, SetokimProcessor
from .visualization import visualize_clusters, visualize_masks

__version__ = "0.1.0"

AutoConfig.register("setok", SetokConfig, exist_ok=True)
AutoModel.register(SetokConfig, SetokModel, exist_ok=True)
AutoConfig.register("setokim", SetokimConfig, exist_ok=True)
AutoModel.register(SetokimConfig, SetokimModel, exist_ok=True)
AutoModelForImageTextToText.register(SetokimConfig, SetokimForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(SetokConfig, image_processor_classes={"pil": SetokImageProcessor}, exist_ok=True)
AutoImageProcessor.register(SetokimConfig, image_processor_classes={"pil": SetokImageProcessor}, exist_ok=True)
AutoProcessor.register(SetokimConfig, SetokimProcessor, exist_ok=True)

__all__ = [
    "SetokConfig",
    "SetokForImageReconstruction",
    "SetokImageProcessor",
    "SetokModel",
    "SetokModelOutput",
    "SetokPreTrainedModel",
    "SetokReconstructionOutput",
    "SetokimConfig",
    "SetokimDiffusionHead",
    "SetokimForConditionalGeneration",
    "SetokimModel",
    "SetokimPreTrainedModel",
    "SetokimProcessor",
    "add_generation_head",
    "add_mask_decoder",
    "build_setokim",
    "dpc_knn_cluster",
    "iterative_cluster",
    "sincos_position_embedding_2d",
    "visualize_clusters",
    "visualize_masks",
]
