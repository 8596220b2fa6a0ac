"""Saving and loading: safetensors round trips, the Auto API, remote code without the package, and building a SeTok
around locally saved pretrained encoders (SigLIP vision, dual SigLIP, CLIP vision, ViT, BERT)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_SETOK_KWARGS, TINY_TEXT_CONFIG, TINY_VISION_KWARGS, WITHOUT_THE_PACKAGE, tiny_config
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from transformers_setok import SetokConfig, SetokForImageReconstruction, SetokImageProcessor, SetokModel


@pytest.fixture(scope="module")
def processor():
    return SetokImageProcessor(size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def images(photos):
    return [photos["astronaut"], photos["chelsea"][::-1], photos["coffee"], photos["rocket"][100:400, 150:500]]


@pytest.fixture(scope="module")
def pixels(images, processor):
    return processor(images, return_tensors="pt").pixel_values


def assert_same_state(left: torch.nn.Module, right: torch.nn.Module, skip_left: str | None = None):
    """`skip_left`: a key prefix of `left` that `right` lacks (SigLIP's pooling head, which SeTok does not build)."""
    left_state, right_state = left.state_dict(), right.state_dict()
    if skip_left is not None:
        left_state = {key: value for key, value in left_state.items() if not key.startswith(skip_left)}
    assert left_state.keys() == right_state.keys()
    for key, value in left_state.items():
        assert value.dtype == right_state[key].dtype, key
        assert torch.equal(value, right_state[key]), key


def config_dict(config) -> dict:
    """`config.to_dict()` without what loading records (`dtype` in the sub-configs, `_name_or_path`)."""

    def strip(value):
        return (
            {k: strip(v) for k, v in value.items() if k not in ("dtype", "_name_or_path")}
            if isinstance(value, dict)
            else value
        )

    return strip(config.to_dict())


def assert_same_outputs(left, right, keys):
    for key in keys:
        assert torch.equal(left[key], right[key]), key


# ----------------------------------------------------------------------------------------------- round trips


def test_setok_model_round_trip(tmp_path, pixels):
    model = SetokModel(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    loaded = SetokModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, SetokConfig)
    assert config_dict(loaded.config) == config_dict(model.config)
    assert_same_state(model, loaded)
    assert not any(p.requires_grad for p in loaded.vision_model.parameters())
    assert all(p.requires_grad for p in loaded.merger.parameters())
    with torch.no_grad():
        assert_same_outputs(
            model(pixels), loaded(pixels), ("last_hidden_state", "attention_mask", "num_tokens", "cluster_assignment")
        )


def test_reconstruction_model_round_trip_with_text_encoder_and_discriminator(tmp_path, pixels):
    config = tiny_config(
        text_config=TINY_TEXT_CONFIG,
        use_discriminator=True,
        discriminator_channels=8,
        cluster_method="iterative",
        iterative_bandwidth_scale=0.5,
        max_num_clusters=16,
        reconstruction_loss="mse",
    )
    model = SetokForImageReconstruction(config).eval()
    with torch.no_grad():
        model.concept_contrast.logit_scale.fill_(3.0)  # a trained value, not the initial one
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = SetokForImageReconstruction.from_pretrained(tmp_path).eval()
    assert config_dict(loaded.config) == config_dict(model.config)
    assert loaded.config.text_config.model_type == "bert" and loaded.config.cluster_method == "iterative"
    assert loaded.discriminator is not None and loaded.concept_contrast is not None
    assert_same_state(model, loaded)
    assert loaded.concept_contrast.logit_scale.item() == 3.0
    assert not any(p.requires_grad for p in loaded.concept_contrast.text_encoder.parameters())
    input_ids = torch.randint(1, 100, (4, 5))
    with torch.no_grad():
        expected = model(pixels, concept_input_ids=input_ids)
        actual = loaded(pixels, concept_input_ids=input_ids)
        fake = expected.reconstruction
        assert torch.equal(model.discriminator(fake), loaded.discriminator(fake))
    assert_same_outputs(
        expected,
        actual,
        ("loss", "reconstruction_loss", "generator_loss", "concept_loss", "reconstruction", "last_hidden_state"),
    )


@pytest.mark.parametrize("freeze", [True, False])
def test_loading_keeps_the_encoders_frozen_as_configured(tmp_path, freeze):
    """Loading replaces every parameter; the frozen encoders must come back frozen (and only those)."""
    SetokForImageReconstruction(
        tiny_config(text_config=TINY_TEXT_CONFIG, freeze_vision_encoder=freeze)
    ).save_pretrained(tmp_path)
    loaded, info = SetokForImageReconstruction.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoModel.from_pretrained(tmp_path)
    for vision in (loaded.model.vision_model, tokenizer.vision_model):
        assert all(p.requires_grad != freeze for p in vision.parameters())
    assert not any(p.requires_grad for p in loaded.concept_contrast.text_encoder.parameters())
    for module in (loaded.model.merger, loaded.detokenizer, loaded.concept_contrast.token_projection):
        assert all(p.requires_grad for p in module.parameters())
    assert loaded.concept_contrast.logit_scale.requires_grad


def test_bf16_round_trip(tmp_path, pixels):
    model = SetokForImageReconstruction(tiny_config()).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    loaded = SetokForImageReconstruction.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16
    assert_same_state(model, loaded)
    with torch.no_grad():
        assert_same_outputs(model(pixels), loaded(pixels), ("reconstruction", "last_hidden_state", "loss"))


def test_from_pretrained_with_eager_attention(tmp_path, pixels):
    model = SetokForImageReconstruction(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    eager = SetokForImageReconstruction.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    assert eager.model.merger.config._attn_implementation == "eager"
    assert eager.detokenizer.config._attn_implementation == "eager"
    with torch.no_grad():
        expected, actual = model(pixels), eager(pixels)
    assert torch.equal(expected.cluster_assignment, actual.cluster_assignment)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.reconstruction, expected.reconstruction, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ Auto API


def test_auto_classes_resolve_to_the_package(tmp_path, processor, pixels):
    model = SetokModel(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is SetokConfig
    auto_model = AutoModel.from_pretrained(tmp_path).eval()
    assert type(auto_model) is SetokModel
    assert_same_state(model, auto_model)
    auto_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto_processor) is SetokImageProcessor
    assert auto_processor.size == {"height": 32, "width": 32}
    photo = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert torch.equal(
        auto_processor(photo, return_tensors="pt").pixel_values, processor(photo, return_tensors="pt").pixel_values
    )


def test_auto_model_loads_the_tokenizer_out_of_a_reconstruction_checkpoint(tmp_path, pixels):
    full = SetokForImageReconstruction(tiny_config()).eval()
    full.save_pretrained(tmp_path)
    tokenizer = AutoModel.from_pretrained(tmp_path).eval()
    assert type(tokenizer) is SetokModel
    assert_same_state(full.model, tokenizer)
    with torch.no_grad():
        assert_same_outputs(full.model(pixels), tokenizer(pixels), ("last_hidden_state", "cluster_assignment"))


CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""
import json
try:
    import transformers_setok  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("transformers_setok is still importable")

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

torch.set_num_threads(1)
folder, images_file, other_folder = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
try:  # the remote class refuses a checkpoint of another model type, as the package's does
    type(model).from_pretrained(other_folder)
    refusal = None
except ValueError as error:
    refusal = str(error)
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
with np.load(images_file) as arrays:
    images = [arrays[key] for key in sorted(arrays.files, key=lambda key: int(key.split("_")[1]))]
with torch.no_grad():
    out = model(processor(images, return_tensors="pt").pixel_values)
print(json.dumps({
    "model_class": f"{type(model).__module__}.{type(model).__name__}",
    "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
    "num_tokens": out.num_tokens.tolist(),
    "tokens": out.last_hidden_state.tolist(),
    "assignment": out.cluster_assignment.tolist(),
    "setok_imported": "transformers_setok" in sys.modules,
    "refusal": refusal,
}))
"""
)


@pytest.fixture
def restore_auto_classes(monkeypatch):
    """`register_for_auto_class` sets a class attribute: undo it so later saves in the session stay plain."""
    for cls in (SetokModel, SetokConfig, SetokImageProcessor):
        monkeypatch.setattr(cls, "_auto_class", getattr(cls, "_auto_class", None))


def test_remote_code_runs_without_the_package(tmp_path, images, processor, restore_auto_classes):
    folder = tmp_path / "setok"
    model = SetokModel(tiny_config()).eval()
    model.register_for_auto_class("AutoModel")
    model.config.register_for_auto_class()
    SetokImageProcessor.register_for_auto_class("AutoImageProcessor")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    modules = ("configuration_setok.py", "modeling_setok.py", "clustering_setok.py", "loading_setok.py")
    for name in modules + ("image_processing_setok.py",):
        assert (folder / name).is_file(), name
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_setok.SetokConfig", "AutoModel": "modeling_setok.SetokModel"}

    images_file = tmp_path / "images.npz"
    np.savez(images_file, *[np.ascontiguousarray(image) for image in images])
    bert = tmp_path / "bert"
    BertModel(BertConfig(**{k: v for k, v in TINY_TEXT_CONFIG.items() if k != "model_type"})).save_pretrained(bert)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(images_file), str(bert)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child["setok_imported"] is False
    assert child["model_class"].startswith("transformers_modules.") and child["model_class"].endswith(".SetokModel")
    assert child["processor_class"].endswith(".SetokImageProcessor")
    assert "transformers_setok" not in child["model_class"] + child["processor_class"]
    assert child["refusal"] is not None and str(bert) in child["refusal"] and "'bert'" in child["refusal"]

    with torch.no_grad():
        expected = model(processor(images, return_tensors="pt").pixel_values)
    assert child["num_tokens"] == expected.num_tokens.tolist()
    assert child["assignment"] == expected.cluster_assignment.tolist()
    torch.testing.assert_close(torch.tensor(child["tokens"]), expected.last_hidden_state, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- pretrained encoders


def _siglip_dual():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)
    return SiglipModel(SiglipConfig(vision_config=TINY_VISION_KWARGS, text_config=text))


ENCODERS = {
    # name: (build the pretrained model, its vision tower, leading tokens the tower emits before the patches)
    "siglip_vision": (lambda: SiglipVisionModel(SiglipVisionConfig(**TINY_VISION_KWARGS)), lambda m: m, 0),
    "siglip_dual": (_siglip_dual, lambda m: m.vision_model, 0),
    "clip_vision": (lambda: CLIPVisionModel(CLIPVisionConfig(**TINY_VISION_KWARGS)), lambda m: m, 1),
    "vit": (lambda: ViTModel(ViTConfig(**TINY_VISION_KWARGS)), lambda m: m, 1),
}


def assert_freshly_initialised(module: torch.nn.Module, std: float = 0.02):
    for name, param in module.named_parameters():
        assert torch.isfinite(param).all(), name
        if name.endswith("bias"):
            assert (param == 0).all(), name
        elif "norm" in name:
            assert (param == 1).all(), name
        elif param.numel() >= 256:
            assert 0.5 * std < param.std() < 1.5 * std, name


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_from_pretrained_encoders(tmp_path, pixels, encoder):
    build, tower, num_prefix = ENCODERS[encoder]
    pretrained = build().eval()
    pretrained.save_pretrained(tmp_path)
    model = SetokForImageReconstruction.from_pretrained_encoders(str(tmp_path), **TINY_SETOK_KWARGS).eval()

    assert model.config.grid_size == 8 and model.config.token_dim == 48
    assert_same_state(tower(pretrained), model.model.vision_model, skip_left="head.")
    assert not any(p.requires_grad for p in model.model.vision_model.parameters())
    assert_freshly_initialised(model.model.merger)
    assert_freshly_initialised(model.detokenizer)
    assert 0.01 < model.detokenizer.query_embeddings.std() < 0.03

    with torch.no_grad():
        out = model.model(pixels, output_patch_features=True)
        reference = tower(pretrained)(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        loss = model(pixels).loss
    assert reference.shape[1] == 64 + num_prefix
    assert out.patch_features.shape == (4, 64, 32)
    torch.testing.assert_close(out.patch_features, reference[:, num_prefix:], rtol=0, atol=1e-6)
    assert out.cluster_assignment.shape == (4, 8, 8) and (out.num_tokens >= 1).all()
    assert torch.isfinite(loss)


def test_from_pretrained_encoders_for_the_tokenizer_alone(tmp_path, pixels):
    pretrained = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION_KWARGS))
    pretrained.save_pretrained(tmp_path)
    model = SetokModel.from_pretrained_encoders(str(tmp_path), **TINY_SETOK_KWARGS).eval()
    assert type(model) is SetokModel
    assert_same_state(pretrained, model.vision_model, skip_left="head.")
    with torch.no_grad():
        assert (model(pixels).num_tokens >= 1).all()


@pytest.mark.parametrize("text_source", ["bert", "siglip_dual"])
def test_from_pretrained_encoders_with_a_text_encoder(tmp_path, pixels, text_source):
    vision = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION_KWARGS))
    vision.save_pretrained(tmp_path / "vision")
    if text_source == "bert":
        text = BertModel(BertConfig(**{k: v for k, v in TINY_TEXT_CONFIG.items() if k != "model_type"}))
        expected_text = text
    else:
        text = _siglip_dual()
        expected_text = text.text_model
    text.save_pretrained(tmp_path / "text")
    model = SetokForImageReconstruction.from_pretrained_encoders(
        str(tmp_path / "vision"), text_model_name_or_path=str(tmp_path / "text"), **TINY_SETOK_KWARGS
    ).train()

    contrast = model.concept_contrast
    assert contrast is not None and model.config.text_config.hidden_size == 32
    assert_same_state(expected_text, contrast.text_encoder)
    assert_same_state(vision, model.model.vision_model, skip_left="head.")
    assert_freshly_initialised(contrast.token_projection)
    torch.testing.assert_close(contrast.logit_scale, torch.tensor(float(np.log(1 / 0.07))))

    input_ids = torch.randint(1, 100, (4, 6))
    out = model(pixels, concept_input_ids=input_ids)
    assert torch.isfinite(out.concept_loss)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in contrast.text_encoder.parameters())
    assert contrast.token_projection.weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path / "setok")
    loaded = SetokForImageReconstruction.from_pretrained(tmp_path / "setok").eval()
    assert type(loaded.concept_contrast.text_encoder) is type(expected_text)
    assert_same_state(model, loaded)
    with torch.no_grad():
        assert torch.equal(
            model.eval()(pixels, concept_input_ids=input_ids).loss, loaded(pixels, concept_input_ids=input_ids).loss
        )


def test_from_pretrained_encoders_rejects_a_text_model_as_vision_encoder(tmp_path):
    """A text model given as the vision encoder is refused with an error naming `vision_config`."""
    BertModel(BertConfig(**{k: v for k, v in TINY_TEXT_CONFIG.items() if k != "model_type"})).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vision_config"):
        SetokForImageReconstruction.from_pretrained_encoders(str(tmp_path), **TINY_SETOK_KWARGS)
