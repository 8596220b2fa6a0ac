from .clustering_setok import dpc_knn_cluster, iterative_cluster, sincos_position_embedding_2d
from .configuration_setok import SetokConfig
from .modeling_setok import (
    SetokForImageReconstruction,
    SetokModel,
    SetokModelOutput,
    SetokPreTrainedModel,
    SetokReconstructionOutput,
)

__all__ = [
    "SetokConfig",
    "SetokForImageReconstruction",
    "SetokModel",
    "SetokModelOutput",
    "SetokPreTrainedModel",
    "SetokReconstructionOutput",
    "dpc_knn_cluster",
    "iterative_cluster",
    "sincos_position_embedding_2d",
]
