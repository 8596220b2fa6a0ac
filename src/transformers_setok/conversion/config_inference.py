"""The target config read from an upstream checkpoint's tensor shapes; what the shapes do not record comes from
upstream's code (the merger block) and from Vicuna-7B v1.5 (the LLM)."""

import re

import torch
from transformers import LlamaConfig

from ..modeling import SetokConfig, SetokimConfig
from .mapping import strip_ddp_prefix
from .report import ConversionError
from .tokenizer import MERGER_BLOCKS, UPSTREAM_HIDDEN_ACT, UPSTREAM_LAYER_NORM_EPS, UPSTREAM_MERGER_HEADS

# Vicuna-7B v1.5, the upstream LLM, for what its weights do not record.
VICUNA_HEAD_DIM = 128
VICUNA_KWARGS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096}


def infer_setok_config(
    upstream: dict[str, torch.Tensor], base: SetokConfig | None = None, prefix: str = "tokenizer."
) -> SetokConfig:
    """A `SetokConfig` whose merger and token geometry are read from the checkpoint's shapes.

    What the weights do not record comes from upstream's block (exact GELU, LayerNorm eps 1e-5, 2 heads); the rest
    (vision encoder, detokenizer, clustering) from `base`, the paper's defaults when None. The conversion's shape
    checks then verify the encoder against the checkpoint.
    """
    upstream = strip_ddp_prefix(upstream)
    base = base or SetokConfig()
    updates = {
        "hidden_act": UPSTREAM_HIDDEN_ACT,
        "layer_norm_eps": UPSTREAM_LAYER_NORM_EPS,
        "merger_output_norm": False,
    }
    if (norm := _in_either_block(upstream, prefix, "norm1.weight")) is not None:
        updates["merger_hidden_size"] = norm.shape[0]
        updates["merger_num_attention_heads"] = UPSTREAM_MERGER_HEADS
    if (fc1 := _in_either_block(upstream, prefix, "mlp.fc1.weight")) is not None:
        updates["merger_intermediate_size"] = fc1.shape[0]
    for name, (_, count_field) in MERGER_BLOCKS.items():
        if count := _count_layers(upstream, f"{prefix}{name}.layers."):
            updates[count_field] = count
    if (out := upstream.get(prefix + "out.weight")) is not None:
        updates["token_dim"] = out.shape[0]
    return SetokConfig.from_dict({**base.to_dict(), **updates})


def infer_setokim_config(
    upstream: dict[str, torch.Tensor], base: SetokimConfig | None = None, head_dim: int = VICUNA_HEAD_DIM
) -> SetokimConfig:
    """A `SetokimConfig` read from an upstream MLLM checkpoint: the tokenizer as in `infer_setok_config`, the LLM as
    a Llama whose sizes come from the shapes and whose head size (`head_dim`), norm eps and context come from
    Vicuna-7B v1.5. Token ids come from `base`."""
    upstream = strip_ddp_prefix(upstream)
    base = base or SetokimConfig()
    # The LLM's sizes come from these three tensors: name what is absent rather than fail with a bare KeyError.
    required = [
        f"model.{name}.weight" for name in ("embed_tokens", "layers.0.mlp.gate_proj", "layers.0.self_attn.k_proj")
    ]
    if absent := [key for key in required if key not in upstream]:
        raise ConversionError(
            f"Cannot infer the LLM config: the checkpoint lacks {absent}. Is this a full MLLM checkpoint? "
            "Pass --config to give the geometry, or check --kind."
        )
    vision = infer_setok_config(upstream, base.vision_config, prefix="model.vision_tower.")
    embed = upstream["model.embed_tokens.weight"]
    hidden = embed.shape[1]
    text = LlamaConfig(
        vocab_size=embed.shape[0],
        hidden_size=hidden,
        intermediate_size=upstream["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=_count_layers(upstream, "model.layers."),
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=upstream["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        head_dim=head_dim,
        tie_word_embeddings="lm_head.weight" not in upstream,
        **VICUNA_KWARGS,
    )
    ids = {name: getattr(base, name) for name in ("image_token_id", "boi_token_id", "eoi_token_id")}
    if max(ids.values()) >= text.vocab_size:
        raise ConversionError(
            f"Token ids {ids} do not fit the checkpoint's vocabulary ({text.vocab_size} rows of "
            "model.embed_tokens.weight): pass a config with upstream's token ids."
        )
    return SetokimConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu", **ids)


def _in_either_block(upstream: dict[str, torch.Tensor], prefix: str, key: str) -> torch.Tensor | None:
    """`key` of the inner merger block, else of the inter one (None when neither holds it)."""
    for name in MERGER_BLOCKS:
        if (tensor := upstream.get(f"{prefix}{name}.{key}")) is not None:
            return tensor
    return None


def _count_layers(state_dict, prefix: str) -> int:
    found = {int(match[1]) for key in state_dict if (match := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    return len(found)
