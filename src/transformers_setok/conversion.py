"""Convert the upstream SeTok research checkpoints (github ChocoWu/SeTok, spec section 4) onto our classes.

Two upstream files exist: the stage-1 tokenizer file (`tokenizer.*`, `detokenizer.*`, `rec_loss.*`,
`contrastive_loss.*`) goes to `SetokForImageReconstruction`; the full MLLM (Vicuna/Llama keys plus
`model.vision_tower.*`, `model.mm_in_projector.*`, ...) goes to `SetokimForConditionalGeneration`. Every key is
routed by `startswith` on its prefix (upstream's own loader used `'tokenizer' in key`, which also caught
`detokenizer.*`). The result says what was mapped, what the converter built, which upstream keys have no counterpart
(and why), which of our keys keep their initialisation (and why), and where the converted network is not exactly
upstream's.

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

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig

from .modeling import (
    SetokConfig,
    SetokForImageReconstruction,
    SetokimConfig,
    SetokimForConditionalGeneration,
)

# What upstream's merger block used and its weights cannot tell: nn.GELU, nn.LayerNorm's default eps, nheads=2.
UPSTREAM_HIDDEN_ACT = "gelu"
UPSTREAM_LAYER_NORM_EPS = 1e-5
UPSTREAM_MERGER_HEADS = 2
UPSTREAM_LOGIT_SCALE_MAX = 100.0
# Vicuna-7B v1.5, the upstream LLM, for what its weights do not record.
VICUNA_HEAD_DIM = 128
VICUNA_KWARGS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096}

UNRECOGNISED = "UNRECOGNISED: no conversion rule covers this key"
DETOKENIZER_REASON = (
    "upstream detokenizer (BERT Q-Former mapper + timm ViT pixel decoder, no output head) is a different "
    "architecture from ours"
)
GENERATION_HEAD_REASON = (
    "upstream's diffusion head swapped width and depth (3 wide, 1024 blocks deep; spec 7), a different network from "
    "ours (1024 wide, 3 deep): train `generation_head` in stage 2"
)
OUR_DETOKENIZER_REASON = "no upstream counterpart (upstream's detokenizer differs and had no output head): train it"
DISCRIMINATOR_REASON = (
    "upstream NLayerDiscriminator normalises with BatchNorm2d, ours with GroupNorm(1): its convolutions were trained "
    "against batch statistics and do not carry over; retrain it (training-only module)"
)


class ConversionError(ValueError):
    """The checkpoint and the target config disagree (the message names the upstream key)."""


@dataclass
class ConversionResult:
    """Our state dict plus an account of every upstream key and every one of our keys.

    `mapped`: upstream key -> our keys it filled. `synthesised`: our key -> how the converter built its value.
    `unmapped`: upstream key -> why it has no counterpart. `missing`: our key -> why it keeps its initialisation.
    `warnings`: where the converted network is not exactly upstream's.
    """

    model_class: type
    config: SetokConfig | SetokimConfig
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    mapped: dict[str, list[str]] = field(default_factory=dict)
    synthesised: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def unrecognised(self) -> list[str]:
        return [key for key, reason in self.unmapped.items() if reason == UNRECOGNISED]

    def report(self) -> str:
        filled = {key for ours in self.mapped.values() for key in ours}
        total = len(self.state_dict) + len(self.missing)
        lines = [
            f"Mapped {len(self.mapped)} upstream tensors onto {len(filled)} of the {total} tensors of "
            f"{self.model_class.__name__}; the converter built {len(self.synthesised)}, {len(self.missing)} keep their "
            "initialisation."
        ]
        known = {key: reason for key, reason in self.unmapped.items() if reason != UNRECOGNISED}
        sections = [
            ("Built by the converter", self.synthesised),
            ("Upstream keys without a counterpart", known),
            ("Our keys that keep their initialisation", self.missing),
            ("UNRECOGNISED upstream keys, refused by --strict", dict.fromkeys(self.unrecognised, "")),
        ]
        for title, entries in sections:
            if entries:
                lines += ["", f"{title} ({len(entries)}):", *_summarise(entries)]
        if self.warnings:
            lines += ["", "WARNINGS: where the converted network is not exactly upstream's:"]
            lines += [f"  - {warning}" for warning in self.warnings]
        return "\n".join(lines)


def _summarise(entries: dict[str, str]) -> list[str]:
    """One line per (reason, top-level module): the keys' common prefix and their count."""
    groups = defaultdict(list)
    for key, reason in entries.items():
        groups[reason, key.split(".")[0]].append(key)
    lines = []
    for (reason, _), keys in groups.items():
        label = keys[0] if len(keys) == 1 else ".".join(os.path.commonprefix([k.split(".") for k in keys])) + ".*"
        lines.append(f"  {label:<64} {len(keys):>5}  {reason}".rstrip())
    return lines


class _Conversion:
    """Bookkeeping shared by the rules: routes upstream tensors onto our keys, with shape checks."""

    def __init__(self, upstream: dict[str, torch.Tensor], model_class, config):
        self.upstream = upstream
        self.result = ConversionResult(model_class, config)
        self.targets = target_shapes(model_class, config)
        self.missing_reasons: list[tuple[str, str]] = []

    def under(self, prefix: str) -> dict[str, torch.Tensor]:
        """Upstream tensors whose key starts with `prefix`, keyed by the rest of the key."""
        return {key[len(prefix) :]: value for key, value in self.upstream.items() if key.startswith(prefix)}

    def _put(self, ours: str, tensor: torch.Tensor, source: str):
        expected = self.targets.get(ours)
        if expected is None:
            raise ConversionError(
                f"{source!r} maps to {ours!r}, which the target model does not have: check the config."
            )
        if tuple(tensor.shape) != expected:
            raise ConversionError(
                f"Shape mismatch: upstream {source!r} has shape {tuple(tensor.shape)} but our {ours!r} expects "
                f"{expected} from the config; the config does not describe this checkpoint."
            )
        self.result.state_dict[ours] = tensor

    def take(self, source: str, ours: str, tensor: torch.Tensor | None = None):
        """Map upstream `source` (or a tensor derived from it) onto our `ours`; absent sources are left missing."""
        if source not in self.upstream:
            return
        self._put(ours, self.upstream[source] if tensor is None else tensor, source)
        self.result.mapped.setdefault(source, []).append(ours)

    def take_params(self, source: str, ours: str, names=("weight", "bias")):
        for name in names:
            self.take(f"{source}.{name}", f"{ours}.{name}")

    def build(self, ours: str, tensor: torch.Tensor, how: str, source: str = "(converter)"):
        self._put(ours, tensor, source)
        self.result.synthesised[ours] = how

    def skip_key(self, key: str, reason: str):
        if key in self.upstream and key not in self.result.mapped:
            self.result.unmapped.setdefault(key, reason)

    def skip(self, prefix: str, reason: str):
        """Every upstream key starting with `prefix` has no counterpart, for `reason`."""
        for key in self.upstream:
            if key.startswith(prefix) and key not in self.result.mapped:
                self.result.unmapped.setdefault(key, reason)

    def explain_missing(self, prefix: str, reason: str):
        self.missing_reasons.append((prefix, reason))

    def warn(self, message: str):
        self.result.warnings.append(message)

    def finish(self) -> ConversionResult:
        result = self.result
        for key in self.upstream:
            if key not in result.mapped and key not in result.unmapped:
                result.unmapped[key] = UNRECOGNISED
        for key in self.targets:
            if key not in result.state_dict:
                reasons = [(len(p), r) for p, r in self.missing_reasons if key.startswith(p)]
                result.missing[key] = max(reasons)[1] if reasons else "no upstream value"
        return result


def target_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """Our state dict's key -> shape, from a model built on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        model = model_class(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer (merger, vision encoder) and the stage-1 losses


def _convert_tokenizer(conv: _Conversion, src: str, dst: str, config: SetokConfig):
    """Upstream `SetokTokenizer` keys under `src` onto our `SetokModel` under `dst`."""
    merger = dst + "merger."
    layers = {"inner_encoder": ("intra_layers", "merger_num_intra_layers")}
    layers["inter_encoder"] = ("inter_layers", "merger_num_inter_layers")
    for name, (ours, count_field) in layers.items():
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


def _convert_merger_block(conv: _Conversion, src: str, dst: str, config: SetokConfig, count_field: str):
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


def _take_shared_norm(conv: _Conversion, src: str, i: int, ours: str):
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
            conv.result.mapped.setdefault(alias, []).append(f"{ours}.{name}")


def _split_qkv(conv: _Conversion, src: str, dst: str):
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


def _identity_input_proj(conv: _Conversion, src: str, merger: str, config: SetokConfig):
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


def _check_merger_settings(conv: _Conversion, merger: str, config: SetokConfig):
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


def _convert_vision_tower(conv: _Conversion, src: str, dst: str):
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


def _convert_stage1_losses(conv: _Conversion, config: SetokConfig):
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


def convert_tokenizer_state_dict(upstream: dict[str, torch.Tensor], config: SetokConfig) -> ConversionResult:
    """An upstream stage-1 tokenizer state dict -> a `SetokForImageReconstruction` state dict (with its account)."""
    conv = _Conversion(strip_ddp_prefix(upstream), SetokForImageReconstruction, config)
    _convert_tokenizer(conv, "tokenizer.", "model.", config)
    conv.skip("detokenizer.", DETOKENIZER_REASON)
    conv.explain_missing("detokenizer.", OUR_DETOKENIZER_REASON)
    _convert_stage1_losses(conv, config)
    return conv.finish()


# ----------------------------------------------------------------------------------------------------------------
# The MLLM


def _convert_projector(conv: _Conversion, src: str, dst: str, config: SetokimConfig):
    """Upstream `mlp2x_gelu` (Linear, GELU, Linear as Sequential 0, 1, 2) onto our two-layer projector."""
    found = {key.rsplit(".", 1)[0] for key in conv.under(src)}
    if found and found != {"0", "2"}:
        raise ConversionError(
            f"Upstream {src}* holds modules {sorted(found)}; only the `mlp2x_gelu` projector (Linear, GELU, Linear: "
            "modules 0 and 2) matches ours. A `_Norm` variant, another depth or a single linear has no counterpart."
        )
    conv.take_params(src + "0", dst + "linear_1")
    conv.take_params(src + "2", dst + "linear_2")
    if found and config.projector_hidden_act != "gelu":
        conv.warn(
            f"{dst}: upstream used exact GELU; set projector_hidden_act='gelu' (is {config.projector_hidden_act!r})."
        )


def _convert_language_model(conv: _Conversion, config: SetokimConfig):
    """Upstream's LlamaForCausalLM keys onto our language model and LM head."""
    for part in ("embed_tokens.", "layers.", "norm."):
        for rest in conv.under("model." + part):
            if rest.endswith("rotary_emb.inv_freq"):  # older transformers saved this buffer
                conv.skip_key(f"model.{part}{rest}", "recomputed: rotary frequencies are not weights")
            else:
                conv.take(f"model.{part}{rest}", f"model.language_model.{part}{rest}")
        conv.skip("model." + part, "no counterpart in our language model (check text_config's model type)")
    if config.tie_word_embeddings:
        conv.skip("lm_head.", "the target ties lm_head to model.language_model.embed_tokens")
        conv.explain_missing("lm_head.", "tied to model.language_model.embed_tokens")
        conv.warn("lm_head: the config ties it to the input embeddings; upstream's separate lm_head was dropped.")
    else:
        conv.take_params("lm_head", "lm_head", names=("weight",))


def convert_mllm_state_dict(upstream: dict[str, torch.Tensor], config: SetokimConfig) -> ConversionResult:
    """An upstream Setokim (LLaVA-style Llama) state dict -> a `SetokimForConditionalGeneration` state dict."""
    conv = _Conversion(strip_ddp_prefix(upstream), SetokimForConditionalGeneration, config)
    _convert_tokenizer(conv, "model.vision_tower.", "model.vision_tower.", config.vision_config)
    conv.skip(
        "model.vision_generator.",
        f"Setokim's image_decoder is our stage-1 detokenizer (add_generation_head); the {DETOKENIZER_REASON}",
    )
    _convert_projector(conv, "model.mm_in_projector.", "model.multi_modal_projector.", config)
    conv.skip(
        "model.mm_out_projector.",
        "output projector of upstream's generation path: ours conditions the generation head on the hidden states",
    )
    conv.skip("model.diffloss.", GENERATION_HEAD_REASON)
    _convert_language_model(conv, config)
    conv.warn(
        "image_token_id / boi_token_id / eoi_token_id come from the config: check them against the upstream "
        "tokenizer's added tokens ([Img], [/Img]); the weights do not record them."
    )
    return conv.finish()


# ----------------------------------------------------------------------------------------------------------------
# Loading, detection, config inference


# Wrapper prefixes: `module.` (DistributedDataParallel/DeepSpeed) and `_orig_mod.` (torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _strip_wrappers(key: str) -> str:
    # Wrappers nest in either order (a compiled model wrapped in DDP saves `module._orig_mod.`), so strip repeatedly.
    while key.startswith(WRAPPER_PREFIXES):
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
    return key


def strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading `module.` (DDP/DeepSpeed) and `_orig_mod.` (torch.compile) prefixes, in any order."""
    return {_strip_wrappers(key): value for key, value in state_dict.items()}


def _resolve_checkpoint(path: str) -> str:
    """A folder -> its `*.index.json` (sharded save) or its single weights file; a file is returned unchanged."""
    if not os.path.isdir(path):
        return path
    files = sorted(os.listdir(path))
    indexes = [name for name in files if name.endswith(".index.json")]
    for candidates in (indexes, [name for name in files if name.endswith(WEIGHTS_SUFFIXES)]):
        if len(candidates) == 1:
            return os.path.join(path, candidates[0])
        if len(candidates) > 1:
            raise ConversionError(f"{path} holds several checkpoints {candidates}: pass the one to convert.")
    raise ConversionError(f"{path} holds no *.index.json nor weights file ({', '.join(WEIGHTS_SUFFIXES)}).")


def load_upstream_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from `.bin`/`.pt` via `torch.load(weights_only=True)`.

    Also a sharded save: its `*.index.json` (HF `weight_map`) or the folder holding it, whose shards are merged; and a
    folder holding a single weights file. Trainer-style wrappers (`{"state_dict": ...}`, `{"module": ...}`,
    `{"model": ...}`) are unwrapped.
    """
    path = _resolve_checkpoint(str(path))
    if path.endswith(".index.json"):
        with open(path, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
        folder = os.path.dirname(path)
        merged = {}
        for shard in sorted(set(weight_map.values())):
            merged |= load_upstream_checkpoint(os.path.join(folder, shard))
        if absent := sorted(set(weight_map) - set(merged)):
            raise ConversionError(f"{path} lists keys its shards do not hold: {absent[:5]}")
        return merged
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def detect_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """`"mllm"` for a full Setokim checkpoint, `"tokenizer"` for a stage-1 file."""
    keys = list(strip_ddp_prefix(state_dict))
    if any(
        key.startswith(("model.vision_tower.", "model.layers.", "model.embed_tokens.", "lm_head.")) for key in keys
    ):
        return "mllm"
    if any(key.startswith("tokenizer.") for key in keys):
        return "tokenizer"
    raise ConversionError(
        "Neither a stage-1 tokenizer (tokenizer.*) nor a Setokim (model.vision_tower.*, lm_head.*). A projector-only "
        "file (model.mm_in_projector.*, LLaVA's mm_projector.bin) is not supported: convert the full MLLM checkpoint."
    )


def _count_layers(state_dict, prefix: str) -> int:
    found = {int(match[1]) for key in state_dict if (match := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    return len(found)


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
    norm = upstream.get(prefix + "inner_encoder.norm1.weight", upstream.get(prefix + "inter_encoder.norm1.weight"))
    if norm is not None:
        updates["merger_hidden_size"] = norm.shape[0]
        updates["merger_num_attention_heads"] = UPSTREAM_MERGER_HEADS
    fc1 = upstream.get(prefix + "inner_encoder.mlp.fc1.weight", upstream.get(prefix + "inter_encoder.mlp.fc1.weight"))
    if fc1 is not None:
        updates["merger_intermediate_size"] = fc1.shape[0]
    for name, count_field in (
        ("inner_encoder", "merger_num_intra_layers"),
        ("inter_encoder", "merger_num_inter_layers"),
    ):
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


def load_config(path: str, kind: str) -> SetokConfig | SetokimConfig:
    """A config json file, or a saved folder holding config.json."""
    return (SetokimConfig if kind == "mllm" else SetokConfig).from_pretrained(path)


def convert_checkpoint(upstream: dict[str, torch.Tensor], kind: str, config=None) -> ConversionResult:
    """Convert `upstream` of `kind` ("tokenizer" or "mllm") for `config` (inferred from the shapes when None)."""
    if kind == "mllm":
        return convert_mllm_state_dict(upstream, config or infer_setokim_config(upstream))
    if kind == "tokenizer":
        return convert_tokenizer_state_dict(upstream, config or infer_setok_config(upstream))
    raise ValueError(f"`kind` must be 'tokenizer' or 'mllm', got {kind!r}.")


def build_converted_model(result: ConversionResult, dtype: torch.dtype = torch.float32):
    """Our model with the converted weights loaded; the keys in `result.missing` keep their initialisation."""
    model = result.model_class._from_config(result.config, dtype=dtype)
    loaded = model.load_state_dict(result.state_dict, strict=False)
    if loaded.unexpected_keys or set(loaded.missing_keys) != set(result.missing):
        raise RuntimeError(f"Converted weights do not fit {result.model_class.__name__}: {loaded}")
    return model


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
]
