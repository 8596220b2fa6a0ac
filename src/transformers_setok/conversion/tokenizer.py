"""The stage-1 file (`tokenizer.*`, `detokenizer.*`, `rec_loss.*`, `contrastive_loss.*`) onto
`SetokForImageReconstruction`; `map_tokenizer` also serves the tokenizer inside the MLLM.

Token merger. Upstream's merger block (inner and inter encoder alike) is

    for i in range(n):  x = x + proj_i(attention(qkv_i(norm1(x))))     # n attention sub-layers, one shared norm1
    x = x + fc2(gelu(fc1(norm2(x))))                                  # then a single MLP

and ours is n standard pre-norm layers, `x = x + attn_i(attn_norm_i(x)); x = x + mlp_i(mlp_norm_i(x))`. The two
are the same function when, for every layer i, `attn_norm_i = norm1` and `attn_i = (qkv_i split into q, k, v;
proj_i)`; the last layer's `mlp_norm, mlp = norm2, (fc1, fc2)`; and every earlier layer's `mlp.fc2` weight and bias
are zero, so that its MLP adds exactly 0 (its `mlp_norm` and `fc1` keep their init: they cannot change the output,
and a non-zero `fc1` lets fine-tuning grow the block). The equality also needs what the weights do not record:
upstream's exact-erf GELU (`hidden_act="gelu"`), torch's default LayerNorm eps 1e-5 (`layer_norm_eps=1e-5`) and
its head count (default 2, `merger_num_attention_heads`); the converter warns when the config differs. Upstream's
fused `qkv` rows are `(3, heads, head_dim)`, the same head layout as our q/k/v projections.

Two parts of our merger have no upstream counterpart: `input_proj` (upstream fed encoder features straight into
its merger; it becomes the identity when the widths agree) and the LayerNorm before `output_proj`, which
`merger_output_norm=False` removes (the inferred config sets it; a config that keeps it gets a warning).
"""

import math
import re

import torch

from ..modeling import SetokConfig, SetokForImageReconstruction
from .mapping import Conversion
from .report import (
    DETOKENIZER_REASON,
    DISCRIMINATOR_REASON,
    OUR_DETOKENIZER_REASON,
    ConversionError,
    ConversionResult,
)

# What upstream's merger block used and its weights cannot tell: nn.GELU, nn.LayerNorm's default eps, nheads=2.
UPSTREAM_HIDDEN_ACT = "gelu"
UPSTREAM_LAYER_NORM_EPS = 1e-5
UPSTREAM_MERGER_HEADS = 2
UPSTREAM_LOGIT_SCALE_MAX = 100.0
# Upstream's two merger blocks -> (our layer list in the merger, the config field counting its layers).
MERGER_BLOCKS = {
    "inner_encoder": ("intra_layers", "merger_num_intra_layers"),
    "inter_encoder": ("inter_layers", "merger_num_inter_layers"),
}


def convert_tokenizer_state_dict(upstream: dict[str, torch.Tensor], config: SetokConfig) -> ConversionResult:
    """An upstream stage-1 tokenizer state dict -> a `SetokForImageReconstruction` state dict (with its account)."""
    conv = Conversion(upstream, SetokForImageReconstruction, config)
    map_tokenizer(conv, "tokenizer.", "model.", config)
    conv.skip("detokenizer.", DETOKENIZER_REASON)
    conv.explain_missing("detokenizer.", OUR_DETOKENIZER_REASON)
    _convert_stage1_losses(conv, config)
    return conv.finish()


def map_tokenizer(conv: Conversion, src: str, dst: str, config: SetokConfig):
    """Upstream `SetokTokenizer` keys under `src` onto our `SetokModel` under `dst`."""
    merger = dst + "merger."
    for name, (ours, count_field) in MERGER_BLOCKS.items():
        _convert_merger_block(conv, f"{src}{name}.", f"{merger}{ours}.", config, count_field)
    conv.take_params(src + "out", merger + "output_proj")
    conv.skip(src + "position_embedding.", "recomputed: our 2D sine-cosine position embedding has no weights")
    _convert_vision_tower(conv, src + "image_feature_encoder.vision_tower.", dst + "vision_model.")
    conv.explain_missing(dst + "vision_model.", "not in the checkpoint: start from the pretrained encoder")
    _identity_input_proj(conv, src, merger, config)
    if any(conv.under(src + part) for part in ("inner_encoder.", "inter_encoder.", "out.")):
        if config.merger_output_norm:
            conv.explain_missing(
                merger + "norm.", "no upstream counterpart: upstream's `out` had no LayerNorm before it"
            )
            conv.warn(
                f"{merger}norm: the config has `merger_output_norm=True` but upstream's merger had no LayerNorm "
                "before `out`, so the tokens differ from upstream's until fine-tuned; set it to False for exactness."
            )
        _check_merger_settings(conv, merger, config)


# ----------------------------------------------------------------------------------------------------------------
# The merger


def _convert_merger_block(conv: Conversion, src: str, dst: str, config: SetokConfig, count_field: str):
    """One upstream merger block (shared norm1, n attention sub-layers, one MLP) onto n of our layers.

    See the module docstring for why this is exact.
    """
    block = conv.under(src)
    if not block:
        return
    found = sorted({int(match[1]) for key in block if (match := re.match(r"layers\.(\d+)\.", key))})
    num_layers = getattr(config, count_field)
    if found != list(range(num_layers)):
        raise ConversionError(
            f"Upstream {src}layers.* holds attention sub-layers {found} but the config's `{count_field}` is "
            f"{num_layers}: set it to {len(found)}."
        )
    for i in range(num_layers):
        layer = f"{dst}{i}."
        _take_shared_norm(conv, src, i, layer + "self_attn_norm")
        _split_qkv(conv, f"{src}layers.{i}.1.qkv", layer + "self_attn.")
        conv.take_params(f"{src}layers.{i}.1.proj", layer + "self_attn.out_proj")
    last = f"{dst}{num_layers - 1}."
    conv.take_params(src + "norm2", last + "mlp_norm")
    conv.take_params(src + "mlp.fc1", last + "mlp.fc1")
    conv.take_params(src + "mlp.fc2", last + "mlp.fc2")
    for i in range(num_layers - 1):
        # Upstream has one MLP after all attention sub-layers: every earlier layer's MLP must add exactly zero.
        for name in ("weight", "bias"):
            ours = f"{dst}{i}.mlp.fc2.{name}"
            conv.build(
                ours, torch.zeros(conv.targets[ours]), "zero: upstream's block has a single MLP, in the last layer"
            )
        why = "unused (this layer's mlp.fc2 is zero): keeps its init so that fine-tuning can grow the MLP"
        conv.explain_missing(f"{dst}{i}.mlp_norm.", why)
        conv.explain_missing(f"{dst}{i}.mlp.fc1.", why)


def _take_shared_norm(conv: Conversion, src: str, i: int, ours: str):
    """Layer i's attention norm is upstream's shared `norm1`, which `torch.save` also stored as `layers.{i}.0`."""
    for name in ("weight", "bias"):
        shared, alias = f"{src}norm1.{name}", f"{src}layers.{i}.0.{name}"
        if (
            alias in conv.upstream
            and shared in conv.upstream
            and not torch.equal(conv.upstream[alias], conv.upstream[shared])
        ):
            raise ConversionError(f"Upstream {alias!r} differs from {shared!r}: this is not the shared-norm1 block.")
        conv.take(shared, f"{ours}.{name}")
        if shared not in conv.upstream:  # a checkpoint that deduplicated the shared module the other way round
            conv.take(alias, f"{ours}.{name}")
        elif alias in conv.upstream:
            conv.credit(alias, f"{ours}.{name}")


def _split_qkv(conv: Conversion, src: str, dst: str):
    """Upstream's fused qkv Linear onto our q/k/v projections.

    Upstream reshapes the qkv output as (3, heads, head_dim): the rows are q then k then v, each head-major, which
    is exactly how our attention views q_proj/k_proj/v_proj outputs. Without a bias (qkv_bias=False) ours is zero.
    """
    weight = conv.upstream.get(src + ".weight")
    if weight is None:
        return
    expected = conv.targets.get(dst + "q_proj.weight")
    if expected is None or weight.shape != (3 * expected[0], expected[1]):
        raise ConversionError(
            f"Shape mismatch: upstream {src + '.weight'!r} has shape {tuple(weight.shape)} but our "
            f"{dst}{{q,k,v}}_proj.weight expect {expected} each (3 stacked) from the config."
        )
    bias = conv.upstream.get(src + ".bias")
    for name, part in zip(("q", "k", "v"), weight.chunk(3, dim=0)):
        conv.take(src + ".weight", f"{dst}{name}_proj.weight", part.clone())
    if bias is None:
        for name in ("q", "k", "v"):
            conv.build(f"{dst}{name}_proj.bias", torch.zeros(expected[0], dtype=weight.dtype), "zero: qkv had no bias")
        return
    for name, part in zip(("q", "k", "v"), bias.chunk(3, dim=0)):
        conv.take(src + ".bias", f"{dst}{name}_proj.bias", part.clone())


def _identity_input_proj(conv: Conversion, src: str, merger: str, config: SetokConfig):
    """Upstream fed encoder features straight into its merger; ours projects them first."""
    if not conv.under(src + "inner_encoder."):
        return
    width, vision_width = config.merger_hidden_size, config.vision_config.hidden_size
    if width == vision_width:
        how = "identity: upstream fed encoder features straight into its merger"
        conv.build(merger + "input_proj.weight", torch.eye(width), how)
        conv.build(merger + "input_proj.bias", torch.zeros(width), how)
        return
    conv.explain_missing(merger + "input_proj.", "no upstream counterpart (upstream had no input projection)")
    conv.warn(
        f"{merger}input_proj: upstream had no input projection, and the merger width ({width}) differs from the "
        f"encoder width ({vision_width}), so it cannot be the identity: it keeps its init and must be trained."
    )


def _check_merger_settings(conv: Conversion, merger: str, config: SetokConfig):
    """What upstream's block did that its weights do not record."""
    if config.hidden_act != UPSTREAM_HIDDEN_ACT:
        conv.warn(
            f"{merger}*.mlp: upstream used exact GELU; set hidden_act={UPSTREAM_HIDDEN_ACT!r} (is {config.hidden_act!r})."
        )
    if not math.isclose(config.layer_norm_eps, UPSTREAM_LAYER_NORM_EPS):
        conv.warn(
            f"{merger}*norm: upstream's LayerNorms used eps {UPSTREAM_LAYER_NORM_EPS}; set layer_norm_eps to it "
            f"(is {config.layer_norm_eps})."
        )
    if config.merger_num_attention_heads != UPSTREAM_MERGER_HEADS:
        conv.warn(
            f"{merger}*.self_attn: the head count is not recorded in the weights; upstream's default was "
            f"{UPSTREAM_MERGER_HEADS}, the config says {config.merger_num_attention_heads}. Keep it only if the "
            "checkpoint was trained with that many heads."
        )


# ----------------------------------------------------------------------------------------------------------------
# The vision encoder and the stage-1 losses


def _convert_vision_tower(conv: Conversion, src: str, dst: str):
    """Upstream held a whole SigLIP (both towers); our encoder is its vision tower."""
    for rest in conv.under(src + "vision_model."):
        for ours in (dst + rest, dst + "vision_model." + rest):  # flat (SigLIP vision) or nested encoders
            if ours in conv.targets:
                conv.take(src + "vision_model." + rest, ours)
                break
    conv.skip(
        src + "vision_model.",
        "no counterpart in our encoder (e.g. SigLIP's pooling head, which SeTok does not use: vision_use_head=False)",
    )
    conv.skip(src + "text_model.", "text tower not used by the tokenizer")
    for name in ("logit_scale", "logit_bias"):
        conv.skip(src + name, "SigLIP's image-text logit scale/bias, not used by the tokenizer")


def _convert_stage1_losses(conv: Conversion, config: SetokConfig):
    conv.skip("rec_loss.discriminator.", DISCRIMINATOR_REASON)
    conv.explain_missing("discriminator.", DISCRIMINATOR_REASON)
    for name in ("norm_mean", "norm_std"):
        conv.skip(f"rec_loss.{name}", "constant normalisation buffer of upstream's GAN loss")
    # Both sides store log(1 / temperature) and clamp exp() at 100, so the value carries over unchanged.
    if "concept_contrast.logit_scale" in conv.targets and "contrastive_loss.logit_scale" in conv.upstream:
        conv.take("contrastive_loss.logit_scale", "concept_contrast.logit_scale")
        if config.contrastive_logit_scale_max != UPSTREAM_LOGIT_SCALE_MAX:
            conv.warn(
                f"concept_contrast: upstream clamped the logit scale at {UPSTREAM_LOGIT_SCALE_MAX}, the config at "
                f"{config.contrastive_logit_scale_max}."
            )
    conv.skip("contrastive_loss.logit_scale", "the target config has no text_config, hence no concept contrast")
    conv.skip(
        "contrastive_loss.multi_label_logit_scale", "second temperature of upstream's multi-label term; ours has one"
    )
    conv.skip("contrastive_loss.text_encoder.", "frozen text encoder: ours is built from config.text_config")
    conv.explain_missing(
        "concept_contrast.text_encoder.",
        "frozen text encoder: load pretrained weights with from_pretrained_encoders(text_model_name_or_path=...)",
    )
    conv.explain_missing(
        "concept_contrast.token_projection.", "no upstream counterpart (upstream never specified one)"
    )
