"""Attention paths beyond eager/sdpa: flash attention's inputs, and gradient checkpointing.

The flash-attention path (packed variable-length sequences) is checked on the CPU.
flash-attn needs CUDA, so this registers an attention function with flash attention's calling convention, written
independently of the model (a loop over sequences), and declares flash attention's mask format for it, as hub
kernels do: the model then builds its flash-style inputs (sorted clusters with `cu_seq_lens`, packed keys for cross-attention, 2D padding masks) and the
results must match sdpa's.
"""

import torch
from conftest import tiny_config
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from transformers_setok import SetokForImageReconstruction, SetokImageProcessor


def _attend(q, k, v, scaling):
    """One sequence: `(T, H, D)` queries against `(S, H, D)` keys."""
    weights = torch.einsum("thd,shd->hts", q, k) * scaling
    return torch.einsum("hts,shd->thd", weights.softmax(-1), v)


def emulated_flash_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """What transformers' flash path does: unpad by a 2D mask, or run varlen over `cu_seq_lens` of the flat batch."""
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, T, H, D)
    batch, length = query.shape[:2]
    if attention_mask is not None:
        assert attention_mask.ndim == 2, "flash attention only takes 2D padding masks"
        out = torch.zeros_like(query)
        for b in range(batch):
            real = attention_mask[b].bool()
            out[b, real] = _attend(query[b, real], key[b, real], value[b, real], scaling)
        return out, None
    if "cu_seq_lens_q" not in kwargs:  # dense attention, as in the vision encoder
        return torch.stack([_attend(query[b], key[b], value[b], scaling) for b in range(batch)]), None
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    flat_q, flat_k, flat_v = (t.reshape(-1, *t.shape[-2:]) for t in (query, key, value))
    assert cu_q[-1] == flat_q.shape[0] and cu_k[-1] == flat_k.shape[0], "boundaries must cover the packed tokens"
    out = torch.empty_like(flat_q)
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        out[qs] = _attend(flat_q[qs], flat_k[ks], flat_v[ks], scaling)
    return out.view(batch, length, *out.shape[-2:]), None


AttentionInterface.register("emulated_varlen", emulated_flash_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("emulated_varlen", flash_attention_mask)


def test_flash_style_inputs_match_sdpa(photos):
    model = SetokForImageReconstruction(tiny_config()).eval()
    pixels = SetokImageProcessor(size=32)(list(photos.values()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = model(pixels)
        assert len(set(reference.num_tokens.tolist())) > 1, "need different token counts to exercise padding"
        model.set_attn_implementation("emulated_varlen")
        assert model.model.merger.config._attn_implementation == "emulated_varlen"
        flash = model(pixels)
    assert torch.equal(flash.cluster_assignment, reference.cluster_assignment)
    torch.testing.assert_close(flash.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flash.reconstruction, reference.reconstruction, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(photos):
    model = SetokForImageReconstruction(tiny_config(freeze_vision_encoder=False))
    pixels = SetokImageProcessor(size=32)(list(photos.values()), return_tensors="pt")["pixel_values"]
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(pixels).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(name.startswith("detokenizer.query_layers") and "cross_attn" in name for name in grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
