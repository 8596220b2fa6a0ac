"""The upstream checkpoint converter on synthetic state dicts that follow spec section 4's key names and shapes."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT_CONFIG, TINY_VISION_KWARGS, tiny_config
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM, SiglipConfig, SiglipModel

from transformers_setok import SetokForImageReconstruction, SetokimConfig, SetokimForConditionalGeneration
from transformers_setok.conversion import (
    GENERATION_HEAD_REASON,
    UNRECOGNISED,
    ConversionError,
    build_converted_model,
    convert_mllm_state_dict,
    convert_tokenizer_state_dict,
    detect_kind,
    infer_setok_config,
    infer_setokim_config,
    load_upstream_checkpoint,
    strip_ddp_prefix,
)
from transformers_setok.modeling.layers_setok import segment_attention_kwargs

SCRIPT = Path(__file__).parents[1] / "scripts" / "convert_original_setok.py"
JUNK = ("optimizer_step", "tokenizer.unknown_head.weight")
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def setok_config(**overrides):
    """Tiny SeTok set up like upstream's merger (exact GELU, eps 1e-5, 2 heads), with every optional part."""
    kwargs = dict(
        vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **TINY_VISION_KWARGS),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        merger_num_attention_heads=2,
        merger_output_norm=False,
        text_config=TINY_TEXT_CONFIG,
        use_discriminator=True,
    )
    return tiny_config(**{**kwargs, **overrides})


def setokim_config(**overrides):
    vision = setok_config(text_config=None, use_discriminator=False)
    text = dict(model_type="llama", vocab_size=70, **LLAMA)
    return SetokimConfig(vision_config=vision, text_config=text, image_token_id=67, boi_token_id=68, eoi_token_id=69)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic upstream state dicts


def rand(*shape):
    return torch.randn(*shape) * 0.2


def upstream_block(prefix: str, width: int, ffn: int, num_layers: int, qkv_bias: bool = True) -> dict:
    """Upstream merger block: shared norm1 (also saved as layers.{i}.0), per-layer qkv/proj, one norm2 + MLP."""
    norm1 = {"weight": 1 + rand(width), "bias": rand(width)}
    sd = {f"{prefix}norm1.{name}": value for name, value in norm1.items()}
    sd |= {f"{prefix}norm2.weight": 1 + rand(width), f"{prefix}norm2.bias": rand(width)}
    for i in range(num_layers):
        layer = f"{prefix}layers.{i}."
        sd |= {f"{layer}0.{name}": value.clone() for name, value in norm1.items()}  # the shared module, saved again
        sd |= {f"{layer}1.qkv.weight": rand(3 * width, width), f"{layer}1.proj.weight": rand(width, width)}
        sd |= {f"{layer}1.proj.bias": rand(width)} | ({f"{layer}1.qkv.bias": rand(3 * width)} if qkv_bias else {})
    sd |= {f"{prefix}mlp.fc1.weight": rand(ffn, width), f"{prefix}mlp.fc1.bias": rand(ffn)}
    sd |= {f"{prefix}mlp.fc2.weight": rand(width, ffn), f"{prefix}mlp.fc2.bias": rand(width)}
    return sd


def upstream_siglip() -> SiglipModel:
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50)
    return SiglipModel(SiglipConfig(vision_config=TINY_VISION_KWARGS, text_config=text)).eval()


def upstream_tokenizer(config, prefix: str = "tokenizer.", siglip=None) -> dict:
    """The tokenizer part of a stage-1 file: merger blocks, out, position-embedding buffer, a whole SigLIP."""
    width, ffn = config.merger_hidden_size, config.merger_intermediate_size
    sd = upstream_block(f"{prefix}inner_encoder.", width, ffn, config.merger_num_intra_layers)
    sd |= upstream_block(f"{prefix}inter_encoder.", width, ffn, config.merger_num_inter_layers)
    sd |= {f"{prefix}out.weight": rand(config.token_dim, width), f"{prefix}out.bias": rand(config.token_dim)}
    sd[f"{prefix}position_embedding.inv_freq"] = torch.rand(math.ceil(width / 4))
    siglip = siglip or upstream_siglip()
    sd |= {f"{prefix}image_feature_encoder.vision_tower.{k}": v.clone() for k, v in siglip.state_dict().items()}
    return sd


def upstream_detokenizer(prefix: str, token_dim: int) -> dict:
    """A representative slice of upstream's detokenizer (Q-Former mapper, timm pixel decoder)."""
    names = {
        "mask_tokens": (1, 64, 24),
        "mapper_fc_in.weight": (24, token_dim),
        "mapper.encoder.layer.0.attention.self.query.weight": (24, 24),
        "mapper.encoder.layer.0.crossattention.self.key.weight": (24, 24),
        "decoder_fc_in.weight": (16, 24),
        "pixel_decoder.0.norm1.weight": (16,),
        "pixel_decoder.0.attn.qkv.weight": (48, 16),
        "decoder_norm.weight": (16,),
        "position_embedding.inv_freq": (6,),
        "out.weight": (token_dim, 32),  # looks like the tokenizer's `out`: `'tokenizer' in key` would take it
    }
    return {prefix + name: rand(*shape) for name, shape in names.items()}


def upstream_stage1(config, temperature: float = 0.05) -> dict:
    sd = upstream_tokenizer(config) | upstream_detokenizer("detokenizer.", config.token_dim)
    sd |= {
        "rec_loss.discriminator.main.0.weight": rand(64, 3, 4, 4),
        "rec_loss.discriminator.main.3.running_mean": torch.zeros(128),
        "rec_loss.norm_mean": torch.rand(1, 3, 1, 1),
        "contrastive_loss.logit_scale": torch.tensor(math.log(1 / temperature)),
        "contrastive_loss.text_encoder.embeddings.word_embeddings.weight": rand(50, 32),
    }
    return sd | {key: torch.zeros(1) for key in JUNK}


def upstream_mllm(config, llama=None) -> dict:
    llama = llama or LlamaForCausalLM(LlamaConfig(vocab_size=70, **LLAMA)).eval()
    sd = {key: value.clone() for key, value in llama.state_dict().items()}
    tokenizer = upstream_tokenizer(config.vision_config)
    sd |= {"model.vision_tower." + key.removeprefix("tokenizer."): value for key, value in tokenizer.items()}
    sd |= upstream_detokenizer("model.vision_generator.", config.vision_config.token_dim)
    hidden, token_dim = config.text_config.hidden_size, config.vision_config.token_dim
    sd |= {"model.mm_in_projector.0.weight": rand(hidden, token_dim), "model.mm_in_projector.0.bias": rand(hidden)}
    sd |= {"model.mm_in_projector.2.weight": rand(hidden, hidden), "model.mm_in_projector.2.bias": rand(hidden)}
    sd |= {"model.mm_out_projector.0.weight": rand(token_dim, hidden), "model.diffloss.net.res_blocks.0.w": rand(4)}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    return sd | {key: torch.zeros(1) for key in JUNK}


# ----------------------------------------------------------------------------------------------------------------
# Reference: upstream's merger, written from spec 1.4 / section 4


def reference_block(x, sd, prefix, num_layers, heads, allowed=None):
    """for each i: x += proj_i(attn(qkv_i(norm1(x)))); then x += fc2(gelu(fc1(norm2(x)))). `allowed` (B, N, N)."""

    def norm(h, name):
        return F.layer_norm(h, h.shape[-1:], sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], eps=1e-5)

    batch, length, width = x.shape
    for i in range(num_layers):
        layer = f"{prefix}layers.{i}.1."
        qkv = F.linear(norm(x, "norm1"), sd[layer + "qkv.weight"], sd.get(layer + "qkv.bias"))
        q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * (width // heads) ** -0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + F.linear(attended, sd[layer + "proj.weight"], sd[layer + "proj.bias"])
    hidden = F.gelu(F.linear(norm(x, "norm2"), sd[f"{prefix}mlp.fc1.weight"], sd[f"{prefix}mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[f"{prefix}mlp.fc2.weight"], sd[f"{prefix}mlp.fc2.bias"])


def converted(config, sd):
    result = convert_tokenizer_state_dict(sd, config)
    return build_converted_model(result).eval(), result


# ----------------------------------------------------------------------------------------------------------------
# The merger: numerical equivalence


@pytest.mark.parametrize("heads, qkv_bias", [(2, True), (4, True), (2, False)])
def test_merger_layers_equal_upstream_block_unmasked_and_with_cluster_mask(heads, qkv_bias):
    config = setok_config(merger_num_attention_heads=heads, merger_num_intra_layers=3)
    sd = upstream_tokenizer(config)
    sd |= upstream_block("tokenizer.inner_encoder.", 32, 64, 3, qkv_bias=qkv_bias)
    if not qkv_bias:
        sd = {k: v for k, v in sd.items() if not k.endswith("qkv.bias")}
    model, _ = converted(config, sd)
    x = torch.randn(2, 10, 32)
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [0, 1, 1, 1, 1, 1, 2, 2, 3, 3]])
    masks = {"full": None, "clusters": segments[:, :, None] == segments[:, None, :]}
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        for name, allowed in masks.items():
            kwargs = {} if allowed is None else segment_attention_kwargs(segments, impl, x.dtype)
            ours = x
            with torch.no_grad():
                for layer in model.model.merger.intra_layers:
                    ours = layer(ours, self_attention_kwargs=kwargs)
            expected = reference_block(x, sd, "tokenizer.inner_encoder.", 3, heads, allowed)
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5, msg=f"{impl}, {name} attention")


def test_a_final_norm_upstream_lacked_is_reported():
    config = setok_config(merger_output_norm=True)
    _, result = converted(config, upstream_tokenizer(config))
    assert any("`merger_output_norm=True`" in warning for warning in result.warnings)
    assert {"model.merger.norm.weight", "model.merger.norm.bias"} <= set(result.missing)


def test_merger_equals_upstream_pipeline():
    """Per-cluster inner encoder, mean per cluster, inter encoder, `out`: the converted merger is upstream's."""
    config = setok_config()
    sd = upstream_tokenizer(config)
    model, result = converted(config, sd)
    assert not any("merger_output_norm" in warning for warning in result.warnings)
    merger = model.model.merger
    features = torch.randn(2, 64, 32)
    assignment = torch.randint(0, 5, (2, 64))
    assignment[1] = assignment[1] % 3
    assignment[:, :5] = torch.arange(5) % torch.tensor([[5], [3]])  # every cluster non-empty
    num_clusters = torch.tensor([5, 3])
    with torch.no_grad():
        tokens, mask = merger(features, assignment, num_clusters)
    for b, count in enumerate(num_clusters.tolist()):
        cluster_means = torch.stack(
            [
                reference_block(features[b, assignment[b] == c][None], sd, "tokenizer.inner_encoder.", 2, 2)[0].mean(0)
                for c in range(count)
            ]
        )
        mixed = reference_block(cluster_means[None], sd, "tokenizer.inter_encoder.", 2, 2)[0]
        expected = F.linear(mixed, sd["tokenizer.out.weight"], sd["tokenizer.out.bias"])
        torch.testing.assert_close(tokens[b, :count], expected, atol=1e-5, rtol=1e-5)
        assert mask[b].sum() == count


def test_earlier_layers_mlp_adds_nothing_and_last_layer_holds_the_mlp():
    config = setok_config()
    model, result = converted(config, upstream_stage1(config))
    layers = model.model.merger.intra_layers
    assert not layers[0].mlp.fc2.weight.any() and not layers[0].mlp.fc2.bias.any()
    assert layers[0].mlp.fc1.weight.any(), "fc1 keeps its init so that fine-tuning can grow the MLP"
    assert "model.merger.intra_layers.0.mlp.fc2.weight" in result.synthesised
    assert "model.merger.intra_layers.0.mlp_norm.weight" in result.missing
    torch.testing.assert_close(
        layers[1].mlp.fc1.weight, result.state_dict["model.merger.intra_layers.1.mlp.fc1.weight"]
    )


def test_merger_settings_upstream_did_not_record_are_warned():
    config = setok_config(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, merger_num_attention_heads=4)
    result = convert_tokenizer_state_dict(upstream_stage1(config), config)
    text = "\n".join(result.warnings)
    for expected in ("exact GELU", "eps 1e-05", "head count is not recorded"):
        assert expected in text
    assert "WARNINGS" in result.report()


def test_input_proj_is_identity_when_widths_agree_else_kept_and_warned():
    _, result = converted(setok_config(), upstream_stage1(setok_config()))
    torch.testing.assert_close(result.state_dict["model.merger.input_proj.weight"], torch.eye(32))
    config = setok_config(merger_hidden_size=16, merger_intermediate_size=24, merger_num_attention_heads=2)
    result = convert_tokenizer_state_dict(upstream_stage1(config), config)
    assert "model.merger.input_proj.weight" in result.missing
    assert any("cannot be the identity" in warning for warning in result.warnings)


# ----------------------------------------------------------------------------------------------------------------
# The stage-1 file: accounting, loading, other parts


def test_stage1_conversion_accounts_for_every_key_and_loads_with_exactly_the_expected_missing_keys():
    config = setok_config()
    sd = upstream_stage1(config)
    result = convert_tokenizer_state_dict(sd, config)
    assert set(result.mapped) | set(result.unmapped) == set(sd)
    assert sorted(result.unrecognised) == sorted(JUNK) and result.unmapped[JUNK[1]] == UNRECOGNISED
    for key, reason in result.unmapped.items():
        if key.startswith("detokenizer."):
            assert "different architecture" in reason
        elif key.startswith("tokenizer.image_feature_encoder.vision_tower.text_model."):
            assert reason == "text tower not used by the tokenizer"
        elif key.startswith("rec_loss.discriminator."):
            assert "BatchNorm2d" in reason
    assert result.unmapped["tokenizer.position_embedding.inv_freq"].startswith("recomputed")
    assert "pooling head" in result.unmapped["tokenizer.image_feature_encoder.vision_tower.vision_model.head.probe"]
    # Everything mappable is mapped: all of the tokenizer's merger, `out`, SigLIP vision tower and the temperature.
    mappable = [
        key
        for key in sd
        if key.startswith(("tokenizer.inner_encoder.", "tokenizer.inter_encoder.", "tokenizer.out."))
        or (key.startswith("tokenizer.image_feature_encoder.vision_tower.vision_model.") and ".head." not in key)
    ]
    assert set(mappable) | {"contrastive_loss.logit_scale"} <= set(result.mapped)

    model = SetokForImageReconstruction(config)
    expected_missing = {
        key
        for key in model.state_dict()
        if key.startswith(("detokenizer.", "discriminator.", "concept_contrast.text_encoder."))
        or key.startswith(("concept_contrast.token_projection.", "model.merger.norm."))
        or any(
            key.startswith(f"model.merger.{part}_layers.0.{name}")
            for part in ("intra", "inter")
            for name in ("mlp_norm.", "mlp.fc1.")
        )
    }
    assert set(result.missing) == expected_missing
    loaded = model.load_state_dict(result.state_dict, strict=False)
    assert loaded.unexpected_keys == [] and set(loaded.missing_keys) == expected_missing
    report = result.report()
    for fragment in ("detokenizer.*", "UNRECOGNISED", "optimizer_step", "text tower not used", "keep their init"):
        assert fragment in report


def test_detokenizer_keys_are_not_taken_as_tokenizer_keys():
    """`'tokenizer' in key` (upstream's loader) also matches `detokenizer.*`; prefix matching must not."""
    config = setok_config()
    sd = upstream_stage1(config)
    result = convert_tokenizer_state_dict(sd, config)
    assert all(not key.startswith("detokenizer.") for key in result.mapped)
    assert result.mapped["tokenizer.out.weight"] == ["model.merger.output_proj.weight"]
    torch.testing.assert_close(result.state_dict["model.merger.output_proj.weight"], sd["tokenizer.out.weight"])
    assert not torch.equal(sd["detokenizer.out.weight"][:, :32], sd["tokenizer.out.weight"])


def test_siglip_vision_tower_maps_onto_our_encoder():
    config = setok_config()
    siglip = upstream_siglip()
    model, _ = converted(config, upstream_tokenizer(config, siglip=siglip))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = siglip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.model.get_patch_features(pixels), expected)


@pytest.mark.parametrize("temperature", [0.05, 0.005])
def test_logit_scale_keeps_upstream_temperature(temperature):
    """Upstream stores log(1/T) and clamps exp() at 100; ours stores the same and clamps at log(100)."""
    config = setok_config()
    model, _ = converted(config, upstream_stage1(config, temperature=temperature))
    contrast = model.concept_contrast
    assert contrast.logit_scale.exp().item() == pytest.approx(1 / temperature)
    ours = contrast.logit_scale.clamp(max=contrast.logit_scale_max).exp()
    assert ours.item() == pytest.approx(min(1 / temperature, 100.0))


def test_ddp_prefix_is_stripped():
    config = setok_config()
    sd = upstream_stage1(config)
    result = convert_tokenizer_state_dict({"module." + key: value for key, value in sd.items()}, config)
    assert "module.tokenizer.out.weight" not in result.unmapped and "tokenizer.out.weight" in result.mapped


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_torch_compile_prefix_is_stripped_in_any_order_with_ddp(prefix):
    assert strip_ddp_prefix({prefix + "tokenizer.out.weight": torch.zeros(1)}).keys() == {"tokenizer.out.weight"}
    assert detect_kind({prefix + "lm_head.weight": torch.zeros(1)}) == "mllm"


def test_shape_mismatch_names_the_key_and_both_shapes():
    sd = upstream_stage1(setok_config())
    with pytest.raises(ConversionError, match=r"tokenizer\.inner_encoder\.mlp\.fc1\.weight.*\(64, 32\).*\(48, 32\)"):
        convert_tokenizer_state_dict(sd, setok_config(merger_intermediate_size=48))
    with pytest.raises(ConversionError, match=r"tokenizer\.inner_encoder\.norm1\.weight.*\(32,\).*\(16,\)"):
        convert_tokenizer_state_dict(sd, setok_config(merger_hidden_size=16))
    bad = sd | {"tokenizer.inter_encoder.layers.1.1.qkv.weight": rand(90, 32)}
    with pytest.raises(ConversionError, match=r"inter_encoder\.layers\.1\.1\.qkv\.weight.*\(90, 32\).*\(32, 32\)"):
        convert_tokenizer_state_dict(bad, setok_config())
    bad = sd | {"tokenizer.inner_encoder.layers.1.0.weight": rand(32)}
    with pytest.raises(ConversionError, match=r"layers\.1\.0\.weight.*differs from.*norm1\.weight"):
        convert_tokenizer_state_dict(bad, setok_config())
    with pytest.raises(ConversionError, match=r"sub-layers \[0, 1\].*merger_num_inter_layers.* 3"):
        convert_tokenizer_state_dict(sd, setok_config(merger_num_inter_layers=3))
    with pytest.raises(ConversionError, match=r"vision_model\.embeddings\.patch_embedding\.weight.*\(32, 3, 4, 4\)"):
        convert_tokenizer_state_dict(sd, setok_config(vision_config=dict(TINY_VISION_KWARGS, hidden_size=16)))


def test_infer_setok_config_reads_the_geometry_from_shapes():
    config = setok_config(merger_intermediate_size=40, token_dim=24, merger_num_inter_layers=3)
    sd = upstream_stage1(config)
    base = setok_config(hidden_act="gelu_pytorch_tanh", merger_num_attention_heads=4)
    inferred = infer_setok_config(sd, base)
    assert (inferred.merger_intermediate_size, inferred.token_dim, inferred.merger_num_inter_layers) == (40, 24, 3)
    assert (inferred.hidden_act, inferred.layer_norm_eps, inferred.merger_num_attention_heads) == ("gelu", 1e-5, 2)
    assert inferred.vision_config.hidden_size == 32
    warnings = convert_tokenizer_state_dict(sd, inferred).warnings
    assert inferred.merger_output_norm is False and warnings == []  # the inferred config is upstream's exactly


# ----------------------------------------------------------------------------------------------------------------
# The MLLM


def test_mllm_conversion_maps_llm_projector_and_tokenizer():
    config = setokim_config()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=70, **LLAMA)).eval()
    sd = upstream_mllm(config, llama)
    result = convert_mllm_state_dict(sd, config)
    assert set(result.mapped) | set(result.unmapped) == set(sd)
    assert sorted(result.unrecognised) == sorted(JUNK)
    assert result.unmapped["model.diffloss.net.res_blocks.0.w"] == GENERATION_HEAD_REASON
    assert "output projector of upstream's generation path" in result.unmapped["model.mm_out_projector.0.weight"]
    assert result.unmapped["model.layers.0.self_attn.rotary_emb.inv_freq"].startswith("recomputed")
    assert all("detokenizer" in reason for key, reason in result.unmapped.items() if "vision_generator" in key)
    assert result.mapped["model.vision_tower.out.weight"] == ["model.vision_tower.merger.output_proj.weight"]

    model = build_converted_model(result).eval()
    assert set(result.missing) == {
        key
        for key in model.state_dict()
        if key.startswith("model.vision_tower.merger.norm.")
        or any(f"_layers.0.{name}" in key for name in ("mlp_norm.", "mlp.fc1."))
    }
    ids = torch.tensor([[1, 5, 9, 3, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llama(input_ids=ids).logits)
        tokens = torch.randn(3, 48)
        reference = nn.Sequential(nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 32))
        reference.load_state_dict(
            {k.removeprefix("model.mm_in_projector."): v for k, v in sd.items() if "mm_in_" in k}
        )
        torch.testing.assert_close(model.model.multi_modal_projector(tokens), reference(tokens))


def test_mllm_projector_variants_without_a_counterpart_are_refused():
    config = setokim_config()
    sd = upstream_mllm(config)
    sd |= {"model.mm_in_projector.1.weight": torch.ones(32), "model.mm_in_projector.1.bias": torch.zeros(32)}
    with pytest.raises(ConversionError, match="mlp2x_gelu"):
        convert_mllm_state_dict(sd, config)
    sd = upstream_mllm(config)
    sd["model.mm_in_projector.0.weight"] = rand(32, 40)
    with pytest.raises(ConversionError, match=r"mm_in_projector\.0\.weight.*\(32, 40\).*\(32, 48\)"):
        convert_mllm_state_dict(sd, config)


def test_infer_setokim_config_and_detect_kind():
    config = setokim_config()
    sd = upstream_mllm(config)
    inferred = infer_setokim_config(sd, config, head_dim=8)
    text = inferred.text_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (70, 32, 2, 2)
    assert not text.tie_word_embeddings and text.rms_norm_eps == 1e-5
    assert detect_kind(sd) == "mllm" and detect_kind(upstream_stage1(setok_config())) == "tokenizer"
    assert detect_kind({"module.tokenizer.out.weight": torch.zeros(1)}) == "tokenizer"
    with pytest.raises(ConversionError, match="token ids"):
        infer_setokim_config(sd, SetokimConfig(vision_config=config.vision_config), head_dim=8)


def test_infer_setokim_config_names_the_llm_keys_a_checkpoint_lacks():
    sd = {k: v for k, v in upstream_mllm(setokim_config()).items() if k != "model.embed_tokens.weight"}
    with pytest.raises(ConversionError, match=r"model\.embed_tokens\.weight"):
        infer_setokim_config(sd, head_dim=8)


def test_a_projector_only_file_is_refused_with_a_clear_message_and_not_advertised():
    projector = {f"model.mm_in_projector.{i}.{name}": rand(4) for i in (0, 2) for name in ("weight", "bias")}
    with pytest.raises(ConversionError, match=r"projector-only.*not supported"):
        detect_kind(projector)
    assert "mm_projector.bin" not in SCRIPT.read_text().split("\n\n")[1]  # the usage line


# ----------------------------------------------------------------------------------------------------------------
# Loading


def save_sharded(sd: dict, folder: Path, safetensors: bool) -> Path:
    """An HF-style sharded save: two shards and the index mapping every key to its shard."""
    folder.mkdir()
    keys = sorted(sd)
    name = "model.safetensors" if safetensors else "pytorch_model.bin"
    stem, suffix = name.split(".", 1)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        shard = f"{stem}-{i + 1:05d}-of-00002.{suffix}"
        tensors = {key: sd[key].contiguous() for key in part}
        if safetensors:
            save_file(tensors, folder / shard)
        else:
            torch.save(tensors, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    index = folder / f"{name}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("safetensors", [True, False])
def test_a_sharded_checkpoint_is_loaded_from_its_index_or_its_folder(tmp_path, safetensors):
    sd = upstream_stage1(setok_config())
    index = save_sharded(sd, tmp_path / "sharded", safetensors)
    for path in (index, index.parent):
        loaded = load_upstream_checkpoint(str(path))
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[key], sd[key]) for key in sd)


def test_a_folder_with_a_single_weights_file_is_loaded(tmp_path):
    sd = {"tokenizer.out.weight": rand(4, 4)}
    (tmp_path / "ckpt").mkdir()
    torch.save(sd, tmp_path / "ckpt" / "pytorch_model.bin")
    assert torch.equal(
        load_upstream_checkpoint(str(tmp_path / "ckpt"))["tokenizer.out.weight"], sd["tokenizer.out.weight"]
    )
    torch.save(sd, tmp_path / "ckpt" / "other.pt")
    with pytest.raises(ConversionError, match="several checkpoints"):
        load_upstream_checkpoint(str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("convert_original_setok", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_converts_a_stage1_safetensors_file(cli, tmp_path, capsys):
    config = setok_config()
    sd = upstream_stage1(config)
    save_file(sd, tmp_path / "setok.safetensors")
    config.save_pretrained(tmp_path / "config")
    argv = ["--checkpoint", str(tmp_path / "setok.safetensors"), "--config", str(tmp_path / "config")]
    assert cli([*argv, "--strict", "--out", str(tmp_path / "strict")]) == 1
    assert not (tmp_path / "strict").exists()
    assert cli([*argv, "--out", str(tmp_path / "out")]) == 0
    output = capsys.readouterr().out
    assert (
        "tokenizer checkpoint" in output
        and "UNRECOGNISED upstream keys, refused by --strict (2)" in output
        and "saved SetokForImageReconstruction" in output
    )
    model = SetokForImageReconstruction.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(model.model.merger.output_proj.weight, sd["tokenizer.out.weight"])


def test_cli_converts_an_mllm_bin_file(cli, tmp_path):
    config = setokim_config()
    sd = {key: value for key, value in upstream_mllm(config).items() if key not in JUNK}
    torch.save({"module": sd}, tmp_path / "setokim.bin")
    (tmp_path / "config.json").write_text(config.to_json_string())
    argv = ["--checkpoint", str(tmp_path / "setokim.bin"), "--config", str(tmp_path / "config.json")]
    assert cli([*argv, "--strict", "--out", str(tmp_path / "out")]) == 0
    model = SetokimForConditionalGeneration.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"])
