"""What SeTok's model classes promise beyond their forward: who owns which loss (the GAN schedule is the trainer's,
old configs that still carry it load), loading refuses checkpoints of another model type, the transformers-standard
outputs and accessors, and one weight initialisation whichever way the model is built. Runs on every supported
transformers version (the oldest stack included)."""

import inspect
import json
import math

import pytest
import torch
from conftest import TINY_SETOK_KWARGS, TINY_TEXT_CONFIG, TINY_VISION_KWARGS, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from transformers_setok import SetokConfig, SetokForImageReconstruction, SetokModel
from transformers_setok.modeling.loading_setok import check_model_type


@pytest.fixture(scope="module")
def pixels():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1


# ------------------------------------------------------------------------------------ loss ownership (issue 10)


def test_the_config_and_forward_hold_no_gan_schedule():
    saved = SetokConfig(**tiny_config(use_discriminator=True).to_dict()).to_dict()
    assert not {"disc_start", "disc_weight"} & set(saved)
    assert "global_step" not in inspect.signature(SetokForImageReconstruction.forward).parameters


def test_forward_returns_the_generator_term_unweighted_and_outside_the_loss(pixels):
    model = SetokForImageReconstruction(tiny_config(use_discriminator=True, discriminator_channels=8)).train()
    out = model(pixels)
    # The adversarial term against the current discriminator is the model's; its weight and start are the trainer's.
    assert out.generator_loss is not None and torch.isfinite(out.generator_loss)
    torch.testing.assert_close(out.loss, out.reconstruction_loss)
    with torch.no_grad():
        logits = model.discriminator(out.reconstruction.float())
    torch.testing.assert_close(out.generator_loss, -logits.mean())
    assert model(pixels, return_generator_loss=False).generator_loss is None
    assert model.get_last_layer() is model.detokenizer.pixel_head.weight
    with pytest.raises(ValueError, match="use_discriminator"):
        SetokForImageReconstruction(tiny_config())(pixels, return_generator_loss=True)


def test_reconstruction_target_is_public(pixels):
    model = SetokForImageReconstruction(tiny_config(decoder_patch_size=2))
    target = model.reconstruction_target(pixels.bfloat16())
    assert target.dtype == torch.float32 and target.shape == (2, 3, 16, 16)


def test_an_old_config_json_with_the_gan_schedule_still_loads(tmp_path, pixels):
    model = SetokForImageReconstruction(tiny_config(use_discriminator=True, discriminator_channels=8)).eval()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    assert "disc_start" not in saved
    config_file.write_text(json.dumps(dict(saved, disc_start=500, disc_weight=0.5)))  # as releases before 0.2 wrote

    with pytest.warns(FutureWarning, match="disc_start"):
        loaded = SetokForImageReconstruction.from_pretrained(tmp_path).eval()
    with pytest.warns(FutureWarning, match="disc_weight"):
        assert type(AutoConfig.from_pretrained(tmp_path)) is SetokConfig
    # Kept for SetokTrainer's compatibility path only, and not written again.
    assert (loaded.config.disc_start, loaded.config.disc_weight) == (500, 0.5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model(pixels).loss, loaded(pixels).loss)
    loaded.save_pretrained(tmp_path / "again")
    assert not {"disc_start", "disc_weight"} & set(json.loads((tmp_path / "again" / "config.json").read_text()))


# ----------------------------------------------------------------------------- model type on loading (issue 13)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(**{k: v for k, v in TINY_TEXT_CONFIG.items() if k != "model_type"})).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_class", [SetokModel, SetokForImageReconstruction])
def test_a_checkpoint_of_another_model_type_is_refused(bert_folder, model_class):
    with pytest.raises(ValueError) as error:
        model_class.from_pretrained(bert_folder)
    message = str(error.value)
    assert str(bert_folder) in message and "'bert'" in message and "'setok'" in message
    assert model_class.__name__ in message


def test_an_explicit_config_is_honoured(bert_folder):
    model = SetokModel.from_pretrained(bert_folder, config=tiny_config())
    assert type(model) is SetokModel and model.config.grid_size == 8


def test_hub_arguments_reach_the_check(tmp_path, bert_folder):
    SetokModel(tiny_config()).save_pretrained(tmp_path / "setok")
    BertModel(BertConfig(**{k: v for k, v in TINY_TEXT_CONFIG.items() if k != "model_type"})).save_pretrained(
        tmp_path / "bert"
    )
    assert type(SetokModel.from_pretrained(tmp_path, subfolder="setok")) is SetokModel
    assert type(AutoModel.from_pretrained(tmp_path / "setok")) is SetokModel
    with pytest.raises(ValueError, match="'bert'"):
        SetokModel.from_pretrained(tmp_path, subfolder="bert")
    assert check_model_type(tmp_path, "setok", subfolder="setok", dtype=torch.float32) == "setok"
    assert check_model_type(bert_folder, "setok", config=tiny_config()) is None  # an explicit config wins
    with pytest.raises(ValueError, match="setokim"):
        check_model_type(tmp_path / "setok", "setokim", class_name="SetokimModel")


# ------------------------------------------------------------------------ transformers conventions (issue 12)


def eager_model(model_class=SetokModel, **overrides):
    return model_class._from_config(tiny_config(**overrides), attn_implementation="eager").eval()


def test_forward_returns_the_encoders_hidden_states_and_attentions(pixels):
    model = eager_model()
    with torch.no_grad():
        plain = model(pixels)
        out = model(pixels, output_hidden_states=True, output_attentions=True)
        reference = model.vision_model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    assert plain.hidden_states is None and plain.attentions is None
    layers, heads = TINY_VISION_KWARGS["num_hidden_layers"], TINY_VISION_KWARGS["num_attention_heads"]
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    assert out.attentions[0].shape == (2, heads, 64, 64)
    for ours, theirs in zip(out.hidden_states + out.attentions, reference.hidden_states + reference.attentions):
        assert torch.equal(ours, theirs)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    # Without them the tuple form is unchanged; the config's defaults are honoured as in transformers.
    assert len(model(pixels, return_dict=False)) == len(plain.to_tuple())
    model.config.output_hidden_states = True
    assert len(model(pixels).hidden_states) == layers + 1


def test_the_reconstruction_model_passes_them_through(pixels):
    model = eager_model(SetokForImageReconstruction)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == TINY_VISION_KWARGS["num_hidden_layers"] + 1
    assert len(out.attentions) == TINY_VISION_KWARGS["num_hidden_layers"]


def test_input_embeddings_are_the_encoders_patch_embedding():
    model = SetokForImageReconstruction(tiny_config())
    patch_embedding = model.model.vision_model.embeddings.patch_embedding
    assert model.model.get_input_embeddings() is patch_embedding
    assert model.get_input_embeddings() is patch_embedding
    reference = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION_KWARGS))
    assert type(model.get_input_embeddings()) is type(reference.get_input_embeddings())


# Wide enough that an std is measured to about 1 % (the two inits of issue 12 differed by 11 %).
INIT_VISION = dict(TINY_VISION_KWARGS, hidden_size=128, intermediate_size=256, num_attention_heads=4)
INIT_SETOK = dict(TINY_SETOK_KWARGS, merger_hidden_size=64, detokenizer_hidden_size=64, token_dim=64)


def _init_config():
    return SetokConfig(
        vision_config=dict(model_type="siglip_vision_model", **INIT_VISION),
        text_config=dict(TINY_TEXT_CONFIG, hidden_size=128, intermediate_size=256),
        use_discriminator=True,
        discriminator_channels=16,
        **INIT_SETOK,
    )


def _summary(tensor: torch.Tensor) -> tuple[float, float, float]:
    """Mean, std and the shape statistic E|x - mean| / std (0.866 for a uniform draw, 0.798 for a normal one)."""
    tensor = tensor.detach().float()
    mean, std = float(tensor.mean()), float(tensor.std()) if tensor.numel() > 1 else 0.0
    return mean, std, float((tensor - mean).abs().mean()) / std if std else 0.0


@pytest.mark.parametrize("model_class", [SetokModel, SetokForImageReconstruction])
def test_missing_weights_are_initialised_as_in_a_fresh_model(model_class):
    """`__init__` and `from_pretrained(..., state_dict={})` (every weight missing) draw from the same distributions."""
    config = _init_config()
    torch.manual_seed(0)
    fresh = model_class(config)
    torch.manual_seed(1)
    loaded = model_class.from_pretrained(None, config=config, state_dict={})
    loaded_state = loaded.state_dict()
    assert fresh.state_dict().keys() == loaded_state.keys()
    for name, value in fresh.state_dict().items():
        other = loaded_state[name]
        (mean, std, shape), (other_mean, other_std, other_shape) = _summary(value), _summary(other)
        if std == 0 or other_std == 0 or value.numel() < 1000:  # constants (zeros, ones, a set scale) or too few
            assert math.isclose(mean, other_mean, abs_tol=max(3 * max(std, other_std), 1e-6)), name
            assert math.isclose(std, other_std, rel_tol=0.5, abs_tol=1e-6), name
            continue
        assert abs(other_std / std - 1) < 0.05, (name, std, other_std)
        assert abs(other_mean - mean) < 0.1 * std, (name, mean, other_mean)
        # Uniform (xavier) and normal draws of one std differ in shape.
        assert abs(other_shape - shape) < 0.03, (name, shape, other_shape)


def test_siglip_layers_get_siglips_own_init_either_way():
    config = _init_config()
    fresh = SetokModel(config)
    loaded = SetokModel.from_pretrained(None, config=config, state_dict={})
    for model in (fresh, loaded):
        q_proj = model.vision_model.encoder.layers[0].self_attn.q_proj.weight
        bound = math.sqrt(6 / (2 * INIT_VISION["hidden_size"]))  # xavier_uniform_, SigLIP's init of attention
        assert q_proj.abs().max() <= bound
        assert q_proj.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


# ---------------------------------------------------------------- SigLIP's pooling head is not built (issue 11)


def _head_keys(state_dict) -> set[str]:
    return {key for key in state_dict if ".head." in f".{key}"}


def _vision_prefix(model) -> str:
    """Where the SigLIP encoder's keys start in `model`'s state dict ("vision_model." in a SetokModel)."""
    (key,) = [k for k in model.state_dict() if k.endswith("embeddings.patch_embedding.weight")]
    return key.removesuffix("embeddings.patch_embedding.weight")


def test_setok_builds_no_pooling_head():
    """SeTok clusters the encoder's patch features and never reads the pooled output: the head is not built (it would
    cost parameters, and under ZeRO-3 it cannot run: `nn.MultiheadAttention` reads its unpartitioned weight)."""
    given = SiglipVisionConfig(**TINY_VISION_KWARGS)
    assert given.vision_use_head
    config = SetokConfig(vision_config=given, **TINY_SETOK_KWARGS)
    assert given.vision_use_head, "the caller's config object keeps its head"
    assert config.vision_config.vision_use_head is False
    assert json.loads(config.to_json_string())["vision_config"]["vision_use_head"] is False
    assert SetokConfig().vision_config.vision_use_head is False
    assert tiny_config().vision_config.vision_use_head is False
    model = SetokModel(config)
    with_head = SiglipVisionModel(given).state_dict()
    assert not _head_keys(model.state_dict())
    assert set(model.vision_model.state_dict()) == set(with_head) - _head_keys(with_head)


@pytest.mark.parametrize("model_class", [SetokModel, SetokForImageReconstruction])
def test_a_checkpoint_with_pooling_head_weights_loads_them_as_unexpected(tmp_path, pixels, model_class):
    """A checkpoint saved with the head (an older release, or a config that asked for it) loads: the same SeTok, its
    head keys reported as unexpected."""
    from safetensors.torch import load_file, save_file

    model = model_class(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    head = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION_KWARGS)).state_dict()
    head = {_vision_prefix(model) + key: value for key, value in head.items() if key in _head_keys(head)}
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, **head}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["vision_config"]["vision_use_head"] = True
    (tmp_path / "config.json").write_text(json.dumps(saved))

    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert len(head) > 5 and set(info["unexpected_keys"]) == set(head)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert loaded.config.vision_config.vision_use_head is False and not _head_keys(loaded.state_dict())
    with torch.no_grad():
        expected, got = model.eval()(pixels), loaded.eval()(pixels)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)


def test_from_pretrained_encoders_takes_a_siglip_with_its_head(tmp_path, pixels):
    pretrained = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION_KWARGS)).eval()
    assert _head_keys(pretrained.state_dict())
    pretrained.save_pretrained(tmp_path)
    model = SetokModel.from_pretrained_encoders(str(tmp_path), **TINY_SETOK_KWARGS).eval()
    state, reference = model.vision_model.state_dict(), pretrained.state_dict()
    assert set(state) == set(reference) - _head_keys(reference)
    assert all(torch.equal(value, reference[key]) for key, value in state.items())
    with torch.no_grad():
        features = model.get_patch_features(pixels)
        expected = pretrained(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
