"""SeTok and Setokim as native Hugging Face Transformers models.

Importing the package registers the classes with the Auto API (`AutoConfig`, `AutoModel`, `AutoImageProcessor`).
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .modeling import (
    SetokConfig,
    SetokForImageReconstruction,
    SetokModel,
    SetokModelOutput,
    SetokPreTrainedModel,
    SetokReconstructionOutput,
    dpc_knn_cluster,
    iterative_cluster,
    sincos_position_embedding_2d,
)
from .processing import SetokImageProcessor
from .visualization import visualize_clusters

__version__ = "0.1.0"

AutoConfig.register("setok", SetokConfig, exist_ok=True)
AutoModel.register(SetokConfig, SetokModel, exist_ok=True)
AutoImageProcessor.register(SetokConfig, image_processor_classes={"pil": SetokImageProcessor}, exist_ok=True)

__all__ = [
    "SetokConfig",
    "SetokForImageReconstruction",
    "SetokImageProcessor",
    "SetokModel",
    "SetokModelOutput",
    "SetokPreTrainedModel",
    "SetokReconstructionOutput",
    "dpc_knn_cluster",
    "iterative_cluster",
    "sincos_position_embedding_2d",
    "visualize_clusters",
]
