"""The detokenizer's token footprint (`detokenizer_token_footprint`): which token covers each output patch, trained
against the clustering in stage 1 and used to start every query from its own token(s). Tiny configs on CPU."""

import pytest
import torch
from conftest import tiny_config, tiny_processor, tiny_setokim

from transformers_setok import SetokForImageReconstruction, SetokImageProcessor, add_generation_head


@pytest.fixture(scope="module")
def pixels(photos):
    processor = SetokImageProcessor(size={"height": 32, "width": 32})
    a, c, co, r = (photos[name] for name in ("astronaut", "chelsea", "coffee", "rocket"))
    return processor([a, c, co, r, a[:, ::-1], c[::-1]], return_tensors="pt").pixel_values


def footprint_model(**overrides) -> SetokForImageReconstruction:
    return SetokForImageReconstruction(tiny_config(detokenizer_token_footprint=True, **overrides))


def test_without_the_flag_the_detokenizer_is_the_papers(pixels):
    model = SetokForImageReconstruction(tiny_config()).eval()
    assert model.detokenizer.footprint_head is None
    assert not any("footprint" in name for name in model.state_dict())
    out = model(pixels[:2])
    assert out.footprint_loss is None
    assert model.detokenizer.token_footprint(out.last_hidden_state, out.attention_mask) is None


def test_footprint_loss_is_the_cross_entropy_against_the_clustering(pixels):
    model = footprint_model(footprint_loss_weight=0.5).eval()
    out = model(pixels)
    assert (out.attention_mask == 0).any(), "the batch must pad some images' tokens"
    logits = model.detokenizer.token_footprint(out.last_hidden_state, out.attention_mask)
    assert logits.shape == (*out.attention_mask.shape, model.config.num_patches)
    assignment = out.cluster_assignment.flatten(1)
    expected = []
    for b, count in enumerate(out.num_tokens.tolist()):
        # Only the image's own tokens compete for its patches.
        log_probs = logits[b, :count].log_softmax(dim=0)
        expected.append(-log_probs.gather(0, assignment[b][None]).squeeze(0))
    torch.testing.assert_close(out.footprint_loss, torch.cat(expected).mean())
    torch.testing.assert_close(out.loss, out.reconstruction_loss + 0.5 * out.footprint_loss)


def test_padded_tokens_claim_no_patch_and_change_nothing(pixels):
    model = footprint_model().eval()
    with torch.no_grad():
        encoded = model.model(pixels)
        mask = encoded.attention_mask
        footprint = model.detokenizer.token_footprint(encoded.last_hidden_state, mask)
        assert torch.equal(footprint.softmax(dim=1)[mask == 0], torch.zeros_like(footprint[mask == 0]))
        noisy_tokens = (
            encoded.last_hidden_state + 1e3 * torch.randn_like(encoded.last_hidden_state) * (1 - mask)[..., None]
        )
        clean = model.detokenizer(encoded.last_hidden_state, mask)
        noisy = model.detokenizer(noisy_tokens, mask)
        alone = model(pixels[3:4]).reconstruction
    torch.testing.assert_close(noisy, clean, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, clean[3:4], rtol=1e-4, atol=1e-5)


def test_the_footprint_decides_where_a_token_is_painted(pixels):
    """A footprint given by the caller is the one used; one that hands every patch to another token moves the paint."""
    model = footprint_model().eval()
    with torch.no_grad():
        encoded = model.model(pixels[:1])
        tokens, mask = encoded.last_hidden_state, encoded.attention_mask
        own = model.detokenizer.token_footprint(tokens, mask)
        torch.testing.assert_close(model.detokenizer(tokens, mask, footprint=own), model.detokenizer(tokens, mask))
        assignment = encoded.cluster_assignment.flatten(1)
        exact = torch.nn.functional.one_hot(assignment, tokens.shape[1]).transpose(1, 2).float() * 50
        shifted = exact.roll(1, dims=1)
        assert not torch.allclose(
            model.detokenizer(tokens, mask, footprint=exact), model.detokenizer(tokens, mask, footprint=shifted)
        )


def test_the_reconstruction_alone_trains_the_footprint_head(pixels):
    """The unpooling is differentiable: with the footprint term off, the pixel loss still reaches the head."""
    model = footprint_model(footprint_loss_weight=0.0).train()
    model(pixels[:2]).loss.backward()
    assert model.detokenizer.footprint_head.weight.grad.abs().sum() > 0


def agreement_with_the_clustering(model, pixels) -> float:
    """Share of patches whose most-claiming token (by the footprint) is the cluster the patch was merged into."""
    with torch.no_grad():
        encoded = model.model(pixels)
        footprint = model.detokenizer.token_footprint(encoded.last_hidden_state, encoded.attention_mask)
    return (footprint.argmax(dim=1) == encoded.cluster_assignment.flatten(1)).float().mean().item()


def test_training_learns_the_clustering(pixels):
    model = footprint_model(reconstruction_loss="mse").train()
    before = agreement_with_the_clustering(model, pixels)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(40):
        out = model(pixels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((out.footprint_loss.item(), out.reconstruction_loss.item()))
    (first_footprint, first_pixels), (last_footprint, last_pixels) = history[0], history[-1]
    assert last_footprint < 0.5 * first_footprint
    assert last_pixels < 0.7 * first_pixels
    after = agreement_with_the_clustering(model, pixels)
    assert after > 0.5 and after > before + 0.3, (before, after)


def test_save_load_and_the_generation_heads_decoder_keep_it(pixels, tmp_path):
    setok = footprint_model().eval()
    for parameter in setok.detokenizer.footprint_head.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    setok.save_pretrained(tmp_path / "setok")
    reloaded = SetokForImageReconstruction.from_pretrained(tmp_path / "setok").eval()
    assert reloaded.config.detokenizer_token_footprint
    with torch.no_grad():
        expected = setok(pixels[:2]).reconstruction
        torch.testing.assert_close(reloaded(pixels[:2]).reconstruction, expected)

    processor = tiny_processor()
    model = tiny_setokim(processor, vision_config=tiny_config(detokenizer_token_footprint=True)).eval()
    model.model.vision_tower.load_state_dict(setok.model.state_dict())
    add_generation_head(model, str(tmp_path / "setok"), width=40, depth=1)
    with torch.no_grad():
        encoded = setok.model(pixels[:2])
        decoded = model.decode_image_tokens(encoded.last_hidden_state, encoded.num_tokens)
    torch.testing.assert_close(decoded, setok.detokenizer(encoded.last_hidden_state, encoded.attention_mask))

    plain = tiny_setokim(processor)
    plain.model.vision_tower.load_state_dict(setok.model.state_dict())
    with pytest.raises(ValueError, match="detokenizer_token_footprint"):
        add_generation_head(plain, str(tmp_path / "setok"))
