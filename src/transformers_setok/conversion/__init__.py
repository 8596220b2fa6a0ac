"""Convert the upstream SeTok research checkpoints (github ChocoWu/SeTok, spec section 4) onto our classes.

Two upstream files exist: the stage-1 tokenizer file (`tokenizer.*`, `detokenizer.*`, `rec_loss.*`,
`contrastive_loss.*`) goes to `SetokForImageReconstruction`; the full MLLM (Vicuna/Llama keys plus
`model.vision_tower.*`, `model.mm_in_projector.*`, ...) goes to `SetokimForConditionalGeneration`. Every key is
routed by `startswith` on its prefix (upstream's own loader used `'tokenizer' in key`, which also caught
`detokenizer.*`). The result says what was mapped, what the converter built, which upstream keys have no counterpart
(and why), which of our keys keep their initialisation (and why), and where the converted network is not exactly
upstream's.

    convert.py           the entry point: load a checkpoint, detect its kind, convert it, build our model
    tokenizer.py         stage-1 key mapping (merger, vision encoder, losses), and why the merger is exact
    mllm.py              full-MLLM key mapping (tokenizer, projector, Llama)
    config_inference.py  the target config from the checkpoint's tensor shapes
    mapping.py           the bookkeeping the rules share: shape-checked routing, prefix stripping
    report.py            the result, its report, the error and the reasons
"""

from .config_inference import VICUNA_HEAD_DIM, VICUNA_KWARGS, infer_setok_config, infer_setokim_config
from .convert import (
    WEIGHTS_SUFFIXES,
    build_converted_model,
    convert_checkpoint,
    detect_kind,
    load_config,
    load_upstream_checkpoint,
)
from .mapping import WRAPPER_PREFIXES, strip_ddp_prefix, target_shapes
from .mllm import convert_mllm_state_dict
from .report import (
    DETOKENIZER_REASON,
    DISCRIMINATOR_REASON,
    GENERATION_HEAD_REASON,
    OUR_DETOKENIZER_REASON,
    UNRECOGNISED,
    ConversionError,
    ConversionResult,
)
from .tokenizer import (
    UPSTREAM_HIDDEN_ACT,
    UPSTREAM_LAYER_NORM_EPS,
    UPSTREAM_LOGIT_SCALE_MAX,
    UPSTREAM_MERGER_HEADS,
    convert_tokenizer_state_dict,
)

__all__ = [
    "ConversionError",
    "ConversionResult",
    "build_converted_model",
    "convert_checkpoint",
    "convert_mllm_state_dict",
    "convert_tokenizer_state_dict",
    "detect_kind",
    "infer_setok_config",
    "infer_setokim_config",
    "load_config",
    "load_upstream_checkpoint",
    "strip_ddp_prefix",
    "target_shapes",
    # The constants, importable from here as before.
    "DETOKENIZER_REASON",
    "DISCRIMINATOR_REASON",
    "GENERATION_HEAD_REASON",
    "OUR_DETOKENIZER_REASON",
    "UNRECOGNISED",
    "UPSTREAM_HIDDEN_ACT",
    "UPSTREAM_LAYER_NORM_EPS",
    "UPSTREAM_LOGIT_SCALE_MAX",
    "UPSTREAM_MERGER_HEADS",
    "VICUNA_HEAD_DIM",
    "VICUNA_KWARGS",
    "WEIGHTS_SUFFIXES",
    "WRAPPER_PREFIXES",
]
