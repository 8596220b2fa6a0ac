"""Transformer building blocks shared by SeTok's merger and detokenizer.

Attention goes through transformers' attention registry, so `eager`, `sdpa` and `flash_attention_2` are a config
choice. The only place where the implementation matters is the mask format, built by the two helpers at the bottom:
additive 4D masks for eager/sdpa, variable-length sequence boundaries or a 2D padding mask for flash attention.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention on `(B, heads, T, head_dim)` inputs; returns `(B, T, heads, head_dim)`."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class SetokAttention(nn.Module):
    """Multi-head attention; with `key_value_states` it is cross-attention (keys of another width are projected)."""

    def __init__(self, config, hidden_size: int, num_heads: int, dropout: float, key_value_size: int | None = None):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = False
        key_value_size = key_value_size or hidden_size
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(key_value_size, hidden_size)
        self.v_proj = nn.Linear(key_value_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states, key_value_states=None, **attention_kwargs):
        """`hidden_states` `(B, T, D)`, `key_value_states` `(B, S, D_kv)` or None; returns `(B, T, D)`."""
        key_value_states = hidden_states if key_value_states is None else key_value_states
        batch, length = hidden_states.shape[:2]
        kv_shape = (*key_value_states.shape[:2], -1, self.head_dim)  # flash cross-attention packs keys as (1, S_total)
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(key_value_states).view(kv_shape).transpose(1, 2)
        value = self.v_proj(key_value_states).view(kv_shape).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_kwargs.pop("attention_mask", None),
            is_causal=False,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
            **attention_kwargs,
        )
        return self.out_proj(output.reshape(batch, length, -1))


class SetokMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states):
        return self.fc2(self.act(self.fc1(hidden_states)))


class SetokTransformerLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer: self-attention, optional cross-attention, MLP."""

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        dropout: float = 0.0,
        cross_attention_size: int | None = None,
    ):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = SetokAttention(config, hidden_size, num_heads, dropout)
        self.cross_attn = None
        if cross_attention_size is not None:
            self.cross_attn_norm = nn.LayerNorm(hidden_size, eps=eps)
            self.cross_attn = SetokAttention(config, hidden_size, num_heads, dropout, cross_attention_size)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = SetokMLP(hidden_size, intermediate_size, config.hidden_act)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, hidden_states, encoder_hidden_states=None, self_attention_kwargs=None, cross_attention_kwargs=None
    ):
        attended = self.self_attn(self.self_attn_norm(hidden_states), **dict(self_attention_kwargs or {}))
        hidden_states = hidden_states + self.dropout(attended)
        if self.cross_attn is not None:
            attended = self.cross_attn(
                self.cross_attn_norm(hidden_states), encoder_hidden_states, **dict(cross_attention_kwargs or {})
            )
            hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


def _is_flash(attn_implementation: str | None) -> bool:
    """Whether the implementation takes flash attention's inputs (2D padding masks, variable-length boundaries).

    Asked of transformers' mask registry, where flash attention, hub kernels and custom functions all declare it.
    """
    return ALL_MASK_ATTENTION_FUNCTIONS.get(attn_implementation) is flash_attention_mask


def segment_attention_kwargs(segments: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> dict:
    """Attention kwargs that keep every token inside its segment (block-diagonal attention).

    `segments` is `(B, N)` and must be sorted within each row, so that every segment is one contiguous run: flash
    attention then runs variable-length attention over the runs of the flattened batch, and eager/sdpa get an
    additive `(B, 1, N, N)` mask.
    """
    if _is_flash(attn_implementation):
        batch, length = segments.shape
        flat = (segments + torch.arange(batch, device=segments.device)[:, None] * (segments.max() + 2)).flatten()
        starts = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
        edges = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), batch * length)]).to(torch.int32)
        max_length = int(edges.diff().max())
        return {"cu_seq_lens_q": edges, "cu_seq_lens_k": edges, "max_length_q": max_length, "max_length_k": max_length}
    same = segments[:, :, None] == segments[:, None, :]
    return {"attention_mask": _additive(same[:, None], dtype)}


def padding_attention_kwargs(key_mask: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> dict:
    """Self-attention kwargs that hide padded positions; `key_mask` is `(B, S)` with 1 for real positions."""
    if _is_flash(attn_implementation):
        return {"attention_mask": key_mask.to(torch.int32)}
    return {"attention_mask": _additive(key_mask.bool()[:, None, None, :], dtype)}


def cross_attention_inputs(
    states: torch.Tensor, key_mask: torch.Tensor, num_queries: int, attn_implementation: str | None
) -> tuple[torch.Tensor, dict]:
    """Keys and kwargs for `num_queries` queries per image attending to the real rows of padded `states` `(B, S, D)`.

    Flash attention's padding path assumes the queries are padded like the keys, so there the real keys are packed
    into one `(1, S_total, D)` sequence and described by variable-length boundaries instead.
    """
    if not _is_flash(attn_implementation):
        return states, {"attention_mask": _additive(key_mask.bool()[:, None, None, :], states.dtype)}
    lengths = key_mask.sum(-1).to(torch.int32)
    zero = lengths.new_zeros(1)
    cu_k = torch.cat([zero, lengths.cumsum(0, dtype=torch.int32)])
    cu_q = torch.arange(states.shape[0] + 1, device=states.device, dtype=torch.int32) * num_queries
    kwargs = {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": num_queries}
    kwargs["max_length_k"] = int(lengths.max())
    return states[key_mask.bool()][None], kwargs


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's minimum elsewhere (eager adds it; sdpa accepts it)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )
