"""SetokModel and SetokForImageReconstruction: output contract, batch invariance, attention backends, edge images,
input validation, bf16, gradients and the stage-1 losses. Tiny configs on CPU."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_TEXT_CONFIG, tiny_config
from torch import nn

import transformers_setok.modeling.layers_setok as layers_setok
import transformers_setok.modeling.modeling_setok as modeling_setok
from transformers_setok import (
    SetokConfig,
    SetokForImageReconstruction,
    SetokImageProcessor,
    SetokModel,
    dpc_knn_cluster,
    sincos_position_embedding_2d,
)
from transformers_setok.training.setok_trainer import adaptive_adversarial_weight, discriminator_loss

# The iterative variant's defaults hit the cluster cap on every photo with the tiny random encoder: widen the masks.
CLUSTER_METHODS = {
    "dpc_knn": dict(cluster_method="dpc_knn"),
    "iterative": dict(cluster_method="iterative", iterative_bandwidth_scale=0.5, max_num_clusters=32),
}


@pytest.fixture(scope="module")
def processor():
    return SetokImageProcessor(size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def pixels8(photos, processor):
    """8 distinct real images (4 photos, 2 flips, 2 crops) at 32 x 32."""
    a, c, co, r = (photos[name] for name in ("astronaut", "chelsea", "coffee", "rocket"))
    images = [a, c, co, r, a[:, ::-1], c[::-1], co[40:260, 120:420], r[150:400, 100:350]]
    return processor(images, return_tensors="pt").pixel_values


def check_output_contract(out, batch, config):
    grid = config.grid_size
    counts = out.num_tokens
    max_tokens = int(counts.max())
    assert out.last_hidden_state.shape == (batch, max_tokens, config.token_dim)
    assert out.attention_mask.shape == (batch, max_tokens)
    assert counts.shape == (batch,) and counts.dtype == torch.long and (counts >= 1).all()
    assert torch.equal(out.attention_mask.sum(-1), counts)
    assert torch.isfinite(out.last_hidden_state).all()
    assert out.cluster_assignment.shape == (batch, grid, grid)
    for b in range(batch):
        n = int(counts[b])
        assert torch.equal(out.attention_mask[b], (torch.arange(max_tokens) < n).long())
        assert (out.last_hidden_state[b, n:] == 0).all()
        assert (out.last_hidden_state[b, :n].abs().sum(-1) > 0).all()
        # every token comes from at least one patch, and no patch points past the image's tokens
        assert torch.equal(out.cluster_assignment[b].unique(), torch.arange(n))


# --------------------------------------------------------------------------------------------- output contract


def test_model_output_contract(pixels8):
    config = tiny_config()
    model = SetokModel(config).eval()
    with torch.no_grad():
        out = model(pixels8, output_patch_features=True)
    check_output_contract(out, 8, config)
    assert len(set(out.num_tokens.tolist())) > 2, "the batch should mix token counts to exercise the padding"
    assert out.patch_features.shape == (8, config.num_patches, config.vision_config.hidden_size)
    with torch.no_grad():
        assert model(pixels8).patch_features is None


def test_patch_features_are_the_configured_encoder_layer(pixels8):
    model = SetokModel(tiny_config(vision_feature_layer=-2)).eval()
    with torch.no_grad():
        out = model(pixels8[:2], output_patch_features=True)
        hidden = model.vision_model(pixel_values=pixels8[:2], output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.patch_features, hidden[-2], rtol=0, atol=0)


def test_return_dict_false_gives_tuples(pixels8):
    model = SetokModel(tiny_config()).eval()
    recon = SetokForImageReconstruction(tiny_config()).eval()
    with torch.no_grad():
        out = model(pixels8[:2])
        as_tuple = model(pixels8[:2], return_dict=False)
        recon_tuple = recon(pixels8[:2], return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    assert isinstance(recon_tuple, tuple) and recon_tuple[0].ndim == 0


def test_reconstruction_output_contract(pixels8):
    config = tiny_config()
    model = SetokForImageReconstruction(config).eval()
    with torch.no_grad():
        out = model(pixels8[:4])
    check_output_contract(out, 4, config)
    size = config.reconstruction_size
    assert out.reconstruction.shape == (4, 3, size, size)
    assert torch.isfinite(out.reconstruction).all()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.reconstruction_loss)
    assert out.perceptual_loss is None and out.generator_loss is None and out.concept_loss is None
    with torch.no_grad():
        encoded = model.model(pixels8[:4])
        no_loss = model(pixels8[:4], return_loss=False)
    assert no_loss.loss is None and no_loss.reconstruction_loss is None
    torch.testing.assert_close(no_loss.reconstruction, out.reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state, encoded.last_hidden_state, rtol=0, atol=0)


def test_decoder_patch_size_changes_reconstruction_size(pixels8):
    config = tiny_config(decoder_patch_size=2)
    model = SetokForImageReconstruction(config).eval()
    with torch.no_grad():
        out = model(pixels8[:2])
    assert out.reconstruction.shape == (2, 3, 16, 16)
    target = nn.functional.interpolate(pixels8[:2], size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(out.reconstruction_loss, nn.functional.l1_loss(out.reconstruction, target))


# ---------------------------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("cluster_method", list(CLUSTER_METHODS))
def test_image_alone_equals_its_row_in_the_batch(pixels8, cluster_method):
    config = tiny_config(**CLUSTER_METHODS[cluster_method])
    model = SetokModel(config).eval()
    with torch.no_grad():
        batch = model(pixels8)
    check_output_contract(batch, 8, config)
    assert len(set(batch.num_tokens.tolist())) > 1
    for i in range(8):
        with torch.no_grad():
            alone = model(pixels8[i : i + 1])
        n = int(alone.num_tokens[0])
        assert n == int(batch.num_tokens[i])
        assert alone.last_hidden_state.shape[1] == n
        torch.testing.assert_close(alone.last_hidden_state[0], batch.last_hidden_state[i, :n], rtol=0, atol=1e-5)
        assert torch.equal(alone.cluster_assignment[0], batch.cluster_assignment[i])


def test_reconstruction_alone_equals_batch_row(pixels8):
    model = SetokForImageReconstruction(tiny_config()).eval()
    with torch.no_grad():
        batch = model(pixels8, return_loss=False)
        for i in (0, 3, 7):
            alone = model(pixels8[i : i + 1], return_loss=False)
            torch.testing.assert_close(alone.reconstruction[0], batch.reconstruction[i], rtol=0, atol=1e-5)


def test_deterministic_across_runs(pixels8):
    model = SetokForImageReconstruction(tiny_config()).eval()
    with torch.no_grad():
        first, second = model(pixels8), model(pixels8)
    for key in ("last_hidden_state", "num_tokens", "cluster_assignment", "reconstruction", "loss"):
        assert torch.equal(first[key], second[key]), key


def _merger_inputs(num_clusters_a=3, num_clusters_b=10, patches=64, width=32):
    """Two images' position-embedded features with hand-made assignments: A has few clusters, B many."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, patches, width, generator=generator)
    assignment = torch.stack(
        [
            torch.arange(patches) * num_clusters_a // patches,  # contiguous blocks
            torch.randperm(patches, generator=generator) % num_clusters_b,  # scattered over the grid
        ]
    )
    return features, assignment, torch.tensor([num_clusters_a, num_clusters_b])


def test_merger_image_alone_equals_batch_with_more_clusters():
    merger = SetokModel(tiny_config()).eval().merger
    features, assignment, counts = _merger_inputs()
    with torch.no_grad():
        alone, alone_mask = merger(features[:1], assignment[:1], counts[:1])
        batch, batch_mask = merger(features, assignment, counts)
    assert alone.shape == (1, 3, 48) and batch.shape == (2, 10, 48)
    assert torch.equal(batch_mask[0], torch.tensor([1, 1, 1] + [0] * 7))
    torch.testing.assert_close(batch[0, :3], alone[0], rtol=0, atol=1e-5)
    assert (batch[0, 3:] == 0).all()


def test_padded_tokens_never_influence_real_tokens():
    """Fill the padded token rows with huge noise right before the inter-cluster encoder: real tokens don't move."""
    merger = SetokModel(tiny_config()).eval().merger
    features, assignment, counts = _merger_inputs()
    padded = torch.arange(10)[None, :] >= counts[:, None]

    def inject_noise(module, args):
        tokens = args[0].clone()
        tokens[padded] = 1e4 * torch.randn(int(padded.sum()), tokens.shape[-1])
        return (tokens, *args[1:])

    with torch.no_grad():
        clean, _ = merger(features, assignment, counts)
        handle = merger.inter_layers[0].register_forward_pre_hook(inject_noise)
        try:
            noisy, _ = merger(features, assignment, counts)
        finally:
            handle.remove()
    torch.testing.assert_close(noisy, clean, rtol=0, atol=1e-6)


def test_detokenizer_ignores_padded_token_rows(pixels8):
    model = SetokForImageReconstruction(tiny_config()).eval()
    with torch.no_grad():
        encoded = model.model(pixels8)
        mask = encoded.attention_mask
        assert (mask == 0).any()
        noisy_tokens = (
            encoded.last_hidden_state + 1e3 * torch.randn_like(encoded.last_hidden_state) * (1 - mask)[..., None]
        )
        clean = model.detokenizer(encoded.last_hidden_state, mask)
        noisy = model.detokenizer(noisy_tokens, mask)
    torch.testing.assert_close(noisy, clean, rtol=0, atol=1e-5)


def test_intra_cluster_attention_stays_inside_the_cluster():
    """Without inter-cluster layers, token i depends only on the patches of cluster i."""
    merger = SetokModel(tiny_config(merger_num_inter_layers=0)).eval().merger
    features, assignment, counts = _merger_inputs()
    perturbed = features.clone()
    perturbed[1, assignment[1] == 4] += 5 * torch.randn(int((assignment[1] == 4).sum()), features.shape[-1])
    with torch.no_grad():
        clean, _ = merger(features, assignment, counts)
        moved, _ = merger(perturbed, assignment, counts)
    others = [i for i in range(10) if i != 4]
    torch.testing.assert_close(moved[1, others], clean[1, others], rtol=0, atol=1e-5)
    torch.testing.assert_close(moved[0], clean[0], rtol=0, atol=1e-5)
    assert (moved[1, 4] - clean[1, 4]).abs().max() > 1e-2


# ------------------------------------------------------------------------------- attention backends, clustering


def test_eager_and_sdpa_give_the_same_tokens(pixels8, monkeypatch):
    calls = []
    original = layers_setok.eager_attention_forward

    def counting_eager(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layers_setok, "eager_attention_forward", counting_eager)
    model = SetokForImageReconstruction(tiny_config()).eval()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(pixels8)
    assert not calls
    model.set_attn_implementation("eager")
    assert model.model.merger.config._attn_implementation == "eager"
    with torch.no_grad():
        eager = model(pixels8)
    assert calls, "the merger/detokenizer did not switch to eager attention"
    assert torch.equal(eager.num_tokens, sdpa.num_tokens)
    assert torch.equal(eager.cluster_assignment, sdpa.cluster_assignment)
    torch.testing.assert_close(eager.last_hidden_state, sdpa.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(eager.reconstruction, sdpa.reconstruction, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cluster_method", list(CLUSTER_METHODS))
def test_cluster_methods_run_through_the_model(pixels8, cluster_method, monkeypatch):
    seen = []
    for name in ("dpc_knn_cluster", "iterative_cluster"):
        original = getattr(modeling_setok, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            seen.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(modeling_setok, name, spy)
    config = tiny_config(**CLUSTER_METHODS[cluster_method])
    model = SetokForImageReconstruction(config).eval()
    with torch.no_grad():
        out = model(pixels8)
    assert seen == [f"{cluster_method}_cluster"]
    check_output_contract(out, 8, config)
    assert torch.isfinite(out.loss)


def test_max_num_clusters_caps_the_token_count(pixels8):
    free = SetokModel(tiny_config()).eval()
    capped = SetokModel(tiny_config(max_num_clusters=4)).eval()
    capped.load_state_dict(free.state_dict())
    with torch.no_grad():
        counts = free(pixels8).num_tokens
        capped_counts = capped(pixels8).num_tokens
    assert counts.max() > 4
    assert torch.equal(capped_counts, counts.clamp(max=4))


def test_cluster_chunk_size_does_not_change_the_result(pixels8):
    model = SetokModel(tiny_config()).eval()
    with torch.no_grad():
        whole = model(pixels8)
        model.config.cluster_chunk_size = 3
        chunked = model(pixels8)
    assert torch.equal(whole.cluster_assignment, chunked.cluster_assignment)
    torch.testing.assert_close(whole.last_hidden_state, chunked.last_hidden_state, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- edge images


def _rgb(photos):
    return photos["astronaut"]


EDGE_IMAGES = {
    "uniform": lambda photos: np.full((40, 60, 3), 128, dtype=np.uint8),
    "black": lambda photos: np.zeros((32, 32, 3), dtype=np.uint8),
    "one_pixel": lambda photos: np.array([[[200, 10, 30]]], dtype=np.uint8),
    "huge": lambda photos: np.random.default_rng(0).integers(0, 256, (3000, 2000, 3), dtype=np.uint8),
    "grayscale": lambda photos: _rgb(photos).mean(-1).astype(np.uint8),
    "grayscale_pil": lambda photos: PIL.Image.fromarray(_rgb(photos)).convert("L"),
    "rgba": lambda photos: np.dstack([_rgb(photos), np.full(_rgb(photos).shape[:2], 200, np.uint8)]),
    "uint16": lambda photos: _rgb(photos).astype(np.uint16) * 257,
    "float": lambda photos: _rgb(photos).astype(np.float32) / 255,
    "chw_tensor": lambda photos: torch.from_numpy(_rgb(photos)).permute(2, 0, 1),
}


@pytest.mark.parametrize("kind", list(EDGE_IMAGES))
def test_edge_images_through_processor_and_model(photos, processor, kind):
    config = tiny_config()
    model = SetokForImageReconstruction(config).eval()
    pixel_values = processor(EDGE_IMAGES[kind](photos), return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 32, 32) and torch.isfinite(pixel_values).all()
    with torch.no_grad():
        out = model(pixel_values)
    check_output_contract(out, 1, config)
    assert torch.isfinite(out.reconstruction).all() and torch.isfinite(out.loss)


def test_bit_depth_and_layout_do_not_change_the_tokens(photos, processor):
    """uint16 (x 257), float in [0, 1] and CHW tensors carry the same image as uint8 HWC: same tokens."""
    model = SetokModel(tiny_config()).eval()
    reference = processor(_rgb(photos), return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model(reference)
        for kind in ("uint16", "float", "chw_tensor"):
            out = model(processor(EDGE_IMAGES[kind](photos), return_tensors="pt").pixel_values)
            assert torch.equal(out.cluster_assignment, expected.cluster_assignment), kind
            torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-5)


@pytest.mark.parametrize("position_embedding_scale", [1.0, 0.0])
def test_uniform_image_gives_finite_tokens_and_gradients(position_embedding_scale):
    """Identical patch features (uniform image, no position embedding) make every distance zero: no NaN anywhere."""
    model = SetokForImageReconstruction(
        tiny_config(position_embedding_scale=position_embedding_scale, freeze_vision_encoder=False)
    )
    out = model(torch.zeros(2, 3, 32, 32))
    assert (out.num_tokens >= 1).all()
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------- bad input


BAD_PIXELS = {
    "list": ([[0.0] * 32] * 32, TypeError),
    "numpy": (np.zeros((1, 3, 32, 32), dtype=np.float32), TypeError),
    "3d": (torch.zeros(3, 32, 32), ValueError),
    "5d": (torch.zeros(1, 1, 3, 32, 32), ValueError),
    "one_channel": (torch.zeros(2, 1, 32, 32), ValueError),
    "four_channels": (torch.zeros(2, 4, 32, 32), ValueError),
    "empty_batch": (torch.zeros(0, 3, 32, 32), ValueError),
    "wrong_size": (torch.zeros(2, 3, 64, 64), ValueError),
    "not_square": (torch.zeros(2, 3, 32, 16), ValueError),
    "integer": (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError),
    "nan": (torch.zeros(2, 3, 32, 32).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), ValueError),
    "inf": (torch.full((1, 3, 32, 32), float("inf")), ValueError),
}


@pytest.mark.parametrize("model_class", [SetokModel, SetokForImageReconstruction])
@pytest.mark.parametrize("kind", list(BAD_PIXELS))
def test_bad_pixel_values_are_rejected(model_class, kind):
    model = model_class(tiny_config()).eval()
    value, error = BAD_PIXELS[kind]
    with pytest.raises(error, match="pixel_values"):
        model(value)


def test_bad_target_pixel_values_are_rejected():
    model = SetokForImageReconstruction(tiny_config()).eval()
    pixels = torch.zeros(2, 3, 32, 32)
    for target, error in (
        (torch.zeros(2, 1, 32, 32), ValueError),
        (torch.zeros(2, 3, 32, 32, dtype=torch.long), TypeError),
        (torch.full((2, 3, 32, 32), float("nan")), ValueError),
    ):
        with pytest.raises(error, match="target_pixel_values"):
            model(pixels, target_pixel_values=target)


@pytest.fixture(scope="module")
def concept_model():
    torch.manual_seed(0)
    return SetokForImageReconstruction(tiny_config(text_config=TINY_TEXT_CONFIG)).eval()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(concept_input_ids=torch.ones(5, dtype=torch.long)), "concept_input_ids"),
        (dict(concept_input_ids=torch.ones(0, 5, dtype=torch.long)), "concept_input_ids"),
        (
            dict(concept_input_ids=torch.ones(2, 5, dtype=torch.long), concept_attention_mask=torch.ones(2, 4)),
            "concept_attention_mask",
        ),
        (
            dict(concept_input_ids=torch.ones(2, 5, dtype=torch.long), concept_targets=torch.ones(2, 3)),
            "concept_targets",
        ),
        (dict(concept_input_ids=torch.ones(2, 5, dtype=torch.long), concept_targets=torch.ones(2)), "concept_targets"),
        (dict(concept_input_ids=torch.ones(3, 5, dtype=torch.long)), "concept_targets"),
        (
            dict(
                concept_input_ids=torch.ones(3, 5, dtype=torch.long),
                concept_targets=torch.tensor([[1, 0, 0], [1, 1, 0]]),
            ),
            "concept_targets",
        ),
    ],
)
def test_bad_concept_arguments_are_rejected(concept_model, kwargs, name):
    with pytest.raises(ValueError, match=name):
        concept_model(torch.zeros(2, 3, 32, 32), **kwargs)


def test_concept_input_without_text_encoder_is_rejected():
    model = SetokForImageReconstruction(tiny_config()).eval()
    with pytest.raises(ValueError, match="text_config"):
        model(torch.zeros(2, 3, 32, 32), concept_input_ids=torch.ones(2, 5, dtype=torch.long))


def test_generator_loss_without_discriminator_is_rejected():
    model = SetokForImageReconstruction(tiny_config()).eval()
    with pytest.raises(ValueError, match="use_discriminator"):
        model(torch.zeros(1, 3, 32, 32), return_generator_loss=True)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(cluster_method="kmeans"), "cluster_method"),
        (dict(reconstruction_loss="l3"), "reconstruction_loss"),
        (dict(concept_pooling="sum"), "concept_pooling"),
        (dict(merger_hidden_size=30), "merger_hidden_size"),
        (dict(detokenizer_hidden_size=30), "detokenizer_hidden_size"),
        (dict(cluster_k=0), "cluster_k"),
        (dict(cluster_k=-4), "cluster_k"),
        (dict(cluster_k=2.5), "cluster_k"),
        (dict(cluster_fallback_num_clusters=0), "cluster_fallback_num_clusters"),
        (dict(max_num_clusters=0), "max_num_clusters"),
        (dict(token_dim=0), "token_dim"),
        (dict(merger_num_attention_heads=0), "merger_num_attention_heads"),
        (dict(iterative_stop_mass=1.5), "iterative_stop_mass"),
        (dict(contrastive_temperature_init=0.0), "contrastive_temperature_init"),
        (dict(footprint_loss_weight=-1.0), "footprint_loss_weight"),
        (dict(concept_loss_weight=float("nan")), "concept_loss_weight"),
        (dict(reconstruction_loss_weight="1"), "reconstruction_loss_weight"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_rejects_image_smaller_than_a_patch():
    with pytest.raises(ValueError, match="image_size"):
        SetokConfig(vision_config=dict(model_type="siglip_vision_model", image_size=4, patch_size=8))


def test_config_rejects_a_vision_config_without_a_patch_grid():
    with pytest.raises(ValueError, match="vision_config.patch_size"):
        SetokConfig(vision_config=dict(model_type="bert", hidden_size=32, num_attention_heads=4))


def test_config_defaults_follow_the_paper():
    config = SetokConfig()
    assert config.vision_config.model_type == "siglip_vision_model"
    assert (config.grid_size, config.num_patches, config.vision_config.hidden_size) == (27, 729, 1152)
    assert (config.cluster_method, config.cluster_k, config.cluster_threshold) == ("dpc_knn", 64, 0.5)
    assert config.token_dim == 4096 and config.freeze_vision_encoder and config.text_config is None


# ---------------------------------------------------------------------------------------------------------- bf16


def test_bf16_model_clusters_in_float32(pixels8, monkeypatch):
    received = []
    original = modeling_setok.dpc_knn_cluster

    def spy(features, **kwargs):
        received.append(features)
        return original(features, **kwargs)

    monkeypatch.setattr(modeling_setok, "dpc_knn_cluster", spy)
    config = tiny_config()
    model = SetokModel(config).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(pixels8, output_patch_features=True)
    assert out.last_hidden_state.dtype == torch.bfloat16 and out.patch_features.dtype == torch.bfloat16
    assert torch.isfinite(out.last_hidden_state.float()).all()
    check_output_contract(out, 8, config)
    (features,) = received
    assert features.dtype == torch.float32
    position = sincos_position_embedding_2d(config.grid_size, config.grid_size, 32).to(torch.bfloat16)
    torch.testing.assert_close(features, (out.patch_features + position).float(), rtol=0, atol=0)
    assignment, counts = dpc_knn_cluster(
        features, k=config.cluster_k, threshold=config.cluster_threshold, fallback_num_clusters=8
    )
    assert torch.equal(out.cluster_assignment.flatten(1), assignment) and torch.equal(out.num_tokens, counts)


def test_bf16_reconstruction_with_all_terms(pixels8):
    model = SetokForImageReconstruction(
        tiny_config(
            text_config=TINY_TEXT_CONFIG,
            use_discriminator=True,
            discriminator_channels=8,
            detokenizer_token_footprint=True,
        )
    )
    model.to(torch.bfloat16).train()
    ids = torch.randint(1, 100, (4, 5))
    out = model(pixels8[:4].bfloat16(), concept_input_ids=ids)
    assert out.reconstruction.dtype == torch.bfloat16 and torch.isfinite(out.reconstruction.float()).all()
    for name in ("loss", "reconstruction_loss", "generator_loss", "concept_loss", "footprint_loss"):
        assert out[name].dtype == torch.float32 and torch.isfinite(out[name]), name
    (out.loss + out.generator_loss).backward()
    assert model.detokenizer.pixel_head.weight.grad.abs().sum() > 0
    assert model.detokenizer.footprint_head.weight.grad.abs().sum() > 0
    disc_loss = discriminator_loss(model, pixels8[:4], out.reconstruction)
    assert disc_loss.dtype == torch.float32 and torch.isfinite(disc_loss)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(pixels8[:4]).loss)


# ---------------------------------------------------------------------------------------------------- gradients


def _grad_norm(module):
    return sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None)


def test_gradients_with_frozen_encoder(pixels8):
    model = SetokForImageReconstruction(tiny_config()).train()
    model(pixels8[:4]).loss.backward()
    for name, param in model.model.vision_model.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    for module in (model.model.merger, model.detokenizer):
        for name, param in module.named_parameters():
            assert param.requires_grad and param.grad is not None, name
        assert _grad_norm(module) > 0
    assert model.model.merger.input_proj.weight.grad.abs().sum() > 0
    assert model.model.merger.intra_layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.detokenizer.query_embeddings.grad.abs().sum() > 0


def test_unfrozen_encoder_gets_gradients(pixels8):
    model = SetokForImageReconstruction(tiny_config(freeze_vision_encoder=False)).train()
    model(pixels8[:4]).loss.backward()
    vision = model.model.vision_model
    assert vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert vision.encoder.layers[-1].mlp.fc2.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("kind, reference", [("l1", nn.functional.l1_loss), ("mse", nn.functional.mse_loss)])
def test_reconstruction_loss_kinds(pixels8, kind, reference):
    model = SetokForImageReconstruction(tiny_config(reconstruction_loss=kind, reconstruction_loss_weight=2.0)).eval()
    target = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = model(pixels8[:4])
        other = model(pixels8[:4], target_pixel_values=target)
    torch.testing.assert_close(out.reconstruction_loss, reference(out.reconstruction, pixels8[:4]))
    torch.testing.assert_close(out.loss, 2 * out.reconstruction_loss)
    resized = nn.functional.interpolate(target, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(other.reconstruction_loss, reference(other.reconstruction, resized))


def _reference_concept_loss(model, out, input_ids, attention_mask, targets, pooling):
    """Per-image loops, no padding involved: the concept contrast written out plainly."""
    contrast = model.concept_contrast
    with torch.no_grad():
        hidden = contrast.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask[..., None].float()
    texts = nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    rows = []
    for b in range(out.last_hidden_state.shape[0]):
        tokens = out.last_hidden_state[b, : int(out.num_tokens[b])]
        projected = nn.functional.normalize(contrast.token_projection(tokens), dim=-1)
        if pooling == "concept":
            rows.append((projected @ texts.t()).max(0).values)
        else:
            rows.append(nn.functional.normalize(projected.mean(0), dim=-1) @ texts.t())
    logits = contrast.logit_scale.exp() * torch.stack(rows)
    targets = targets.float()

    def direction(scores, positives):
        keep = positives.sum(-1) > 0
        positives = positives[keep] / positives[keep].sum(-1, keepdim=True)
        return -(positives * scores[keep].log_softmax(-1)).sum(-1).mean()

    return (direction(logits, targets) + direction(logits.t(), targets.t())) / 2


@pytest.mark.parametrize("pooling", ["concept", "image"])
def test_concept_contrast_multi_label(pixels8, pooling):
    model = SetokForImageReconstruction(tiny_config(text_config=TINY_TEXT_CONFIG, concept_pooling=pooling)).train()
    # the frozen text encoder keeps its dropout off in training (the reference below runs it in eval mode)
    assert model.concept_contrast.training and not model.concept_contrast.text_encoder.training
    assert model.concept_contrast.text_encoder.config.hidden_dropout_prob > 0
    torch.testing.assert_close(model.concept_contrast.logit_scale, torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    input_ids = torch.randint(1, 100, (5, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 3:] = 0
    attention_mask[4, 2:] = 0
    targets = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [1, 0, 0, 0, 1]])
    out = model(
        pixels8[:4], concept_input_ids=input_ids, concept_attention_mask=attention_mask, concept_targets=targets
    )
    assert torch.isfinite(out.concept_loss)
    expected = _reference_concept_loss(model, out, input_ids, attention_mask, targets, pooling)
    torch.testing.assert_close(out.concept_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.concept_loss)

    out.loss.backward()
    contrast = model.concept_contrast
    for name, param in contrast.text_encoder.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    assert contrast.token_projection.weight.grad.abs().sum() > 0
    assert contrast.logit_scale.grad is not None and contrast.logit_scale.grad.abs() > 0
    assert model.model.merger.output_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["concept", "image"])
def test_concept_targets_default_to_identity(pixels8, pooling):
    model = SetokForImageReconstruction(tiny_config(text_config=TINY_TEXT_CONFIG, concept_pooling=pooling)).eval()
    input_ids = torch.randint(1, 100, (4, 6))
    with torch.no_grad():
        default = model(pixels8[:4], concept_input_ids=input_ids)
        explicit = model(pixels8[:4], concept_input_ids=input_ids, concept_targets=torch.eye(4))
        shuffled = model(pixels8[:4], concept_input_ids=input_ids, concept_targets=torch.eye(4)[[1, 0, 3, 2]])
    torch.testing.assert_close(default.concept_loss, explicit.concept_loss, rtol=0, atol=0)
    assert not torch.allclose(default.concept_loss, shuffled.concept_loss)
    expected = _reference_concept_loss(model, default, input_ids, torch.ones_like(input_ids), torch.eye(4), pooling)
    torch.testing.assert_close(default.concept_loss, expected, rtol=1e-5, atol=1e-5)


def test_logit_scale_is_clamped(pixels8):
    model = SetokForImageReconstruction(
        tiny_config(text_config=TINY_TEXT_CONFIG, contrastive_logit_scale_max=10.0, concept_pooling="image")
    ).eval()
    input_ids = torch.randint(1, 100, (2, 4))
    with torch.no_grad():
        model.concept_contrast.logit_scale.fill_(np.log(1e4))
        out = model(pixels8[:2], concept_input_ids=input_ids)
        model.concept_contrast.logit_scale.fill_(np.log(10.0))
        at_max = model(pixels8[:2], concept_input_ids=input_ids)
    torch.testing.assert_close(out.concept_loss, at_max.concept_loss, rtol=0, atol=0)


def test_patchgan_terms(pixels8):
    model = SetokForImageReconstruction(tiny_config(use_discriminator=True, discriminator_channels=8)).train()
    pixels = pixels8[:2]
    out = model(pixels)
    assert out.generator_loss is not None and torch.isfinite(out.generator_loss)
    # The generator term is returned on its own: its (adaptive, scheduled) weight is the trainer's.
    torch.testing.assert_close(out.loss, out.reconstruction_loss)
    out.generator_loss.backward()
    assert model.detokenizer.pixel_head.weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    disc_loss = discriminator_loss(model, pixels, out.reconstruction)
    assert disc_loss.ndim == 0 and torch.isfinite(disc_loss)
    disc_loss.backward()
    assert _grad_norm(model.discriminator) > 0
    assert all(p.grad is not None for p in model.discriminator.parameters())
    # the reconstruction is detached: the discriminator's loss does not train the generator
    assert all(p.grad is None for p in model.detokenizer.parameters())
    assert all(p.grad is None for p in model.model.merger.parameters())


def test_generator_loss_is_computed_when_asked(pixels8):
    """The model knows no schedule: with a discriminator it gives the term unless told not to, in any mode."""
    model = SetokForImageReconstruction(tiny_config(use_discriminator=True, discriminator_channels=8))
    for mode in (True, False):
        model.train(mode)
        with torch.set_grad_enabled(mode):
            assert model(pixels8[:2]).generator_loss is not None
            out = model(pixels8[:2], return_generator_loss=False)
        assert out.generator_loss is None
        torch.testing.assert_close(out.loss, out.reconstruction_loss)
    with torch.no_grad():
        assert model(pixels8[:2], return_loss=False).generator_loss is None


def test_perceptual_term(pixels8):
    model = SetokForImageReconstruction(tiny_config(perceptual_loss_weight=0.5)).train()
    network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2)).requires_grad_(
        False
    )
    out = model(pixels8[:2])
    assert out.perceptual_loss is None
    model.set_perceptual_network(network)
    out = model(pixels8[:2])
    with torch.no_grad():
        expected = nn.functional.mse_loss(network(out.reconstruction), network(pixels8[:2]))
    torch.testing.assert_close(out.perceptual_loss, expected)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + 0.5 * out.perceptual_loss)
    out.loss.backward()
    assert model.detokenizer.pixel_head.weight.grad.abs().sum() > 0
    assert not any(name.startswith("_perceptual") for name in model.state_dict())
    model.set_perceptual_network(None)
    assert model(pixels8[:2]).perceptual_loss is None


def test_tiny_overfit_lowers_every_loss(photos, processor):
    """Two images, all terms (pixels, perceptual, PatchGAN with its own optimiser, concept): the losses fall."""
    pixels = processor([photos["astronaut"], photos["chelsea"]], return_tensors="pt").pixel_values
    model = SetokForImageReconstruction(
        tiny_config(
            text_config=TINY_TEXT_CONFIG,
            reconstruction_loss="mse",
            perceptual_loss_weight=0.1,
            use_discriminator=True,
            discriminator_channels=8,
        )
    ).train()
    model.set_perceptual_network(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2)).requires_grad_(False)
    )
    input_ids = torch.randint(1, 100, (2, 4))
    generator_params = [
        p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("discriminator")
    ]
    optimizer = torch.optim.Adam(generator_params, lr=3e-3)
    disc_optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=3e-3)
    history = []
    for _ in range(60):
        out = model(pixels, concept_input_ids=input_ids)
        weight = 0.8 * adaptive_adversarial_weight(out.loss, out.generator_loss, model.get_last_layer())
        loss = out.loss + weight * out.generator_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        disc_optimizer.zero_grad()
        discriminator_loss(model, pixels, out.reconstruction).backward()
        disc_optimizer.step()
        history.append({k: out[k].item() for k in ("reconstruction_loss", "concept_loss", "generator_loss")})
        history[-1]["loss"] = loss.item()
    first, last = history[0], history[-1]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert last["loss"] < 0.7 * first["loss"]
    assert last["reconstruction_loss"] < 0.7 * first["reconstruction_loss"]
    assert last["concept_loss"] < 0.7 * first["concept_loss"]


def test_frozen_encoder_stays_in_eval_mode_while_training():
    config = tiny_config(vision_config=dict(tiny_config().vision_config.to_dict(), attention_dropout=0.5))
    frozen = SetokForImageReconstruction(config).train()
    assert frozen.training and frozen.model.merger.training
    assert not frozen.model.vision_model.training
    unfrozen = SetokForImageReconstruction(tiny_config(freeze_vision_encoder=False)).train()
    assert unfrozen.model.vision_model.training


def test_text_encoder_needs_the_reconstruction_model(tmp_path):
    with pytest.raises(ValueError, match="text_model_name_or_path"):
        SetokModel.from_pretrained_encoders(str(tmp_path), text_model_name_or_path=str(tmp_path))


def test_generator_term_leaves_the_discriminator_untouched(pixels8):
    model = SetokForImageReconstruction(tiny_config(use_discriminator=True)).train()
    output = model(pixels8[:2])
    output.generator_loss.backward()
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert model.detokenizer.pixel_head.weight.grad is not None


def test_target_batch_and_feature_layer_and_concept_types_are_checked(pixels8):
    model = SetokForImageReconstruction(tiny_config(text_config=TINY_TEXT_CONFIG))
    with pytest.raises(ValueError, match="target_pixel_values"):
        model(pixels8[:4], target_pixel_values=pixels8[:1])
    with pytest.raises(TypeError, match="concept_input_ids"):
        model(pixels8[:2], concept_input_ids=[[1, 2], [3, 4]])
    for layer in (3, -4):  # the tiny encoder has 2 layers, so 3 hidden states
        with pytest.raises(ValueError, match="vision_feature_layer"):
            tiny_config(vision_feature_layer=layer)
    assert tiny_config(vision_feature_layer=-3).vision_feature_layer == -3
