from .clustering_setok import dpc_knn_cluster, iterative_cluster, sincos_position_embedding_2d
from .configuration_setok import SetokConfig
from .configuration_setokim import SetokimConfig
from .diffusion_head_setokim import SetokimDiffusionHead
from .mask_decoder_setokim import SetokimMaskDecoder
from .modeling_setok import (
    SetokForImageReconstruction,
    SetokModel,
    SetokModelOutput,
    SetokPreTrainedModel,
    SetokReconstructionOutput,
)
from .modeling_setokim import (
    SetokimForConditionalGeneration,
    SetokimImageFeatures,
    SetokimMaskPrediction,
    SetokimModel,
    SetokimPreTrainedModel,
)

__all__ = [
    "SetokConfig",
    "SetokForImageReconstruction",
    "SetokModel",
    "SetokModelOutput",
    "SetokPreTrainedModel",
    "SetokReconstructionOutput",
    "SetokimConfig",
    "SetokimDiffusionHead",
    "SetokimForConditionalGeneration",
    "SetokimImageFeatures",
    "SetokimMaskDecoder",
    "SetokimMaskPrediction",
    "SetokimModel",
    "SetokimPreTrainedModel",
    "dpc_knn_cluster",
    "iterative_cluster",
    "sincos_position_embedding_2d",
]
