"""Setokim's generation head: a small MLP denoiser that draws one SeTok token from the LLM's hidden state (MAR style).

    hidden state h_i at a target position  ->  condition c = embed(h_i) + embed(t)
    noisy token x_t (token_dim)            ->  Linear -> depth x [adaLN residual MLP block] -> adaLN -> Linear -> v

The head only predicts, for one noisy token vector, its velocity v (or its noise eps, after
`config.diffusion_prediction_type`) given the timestep and the condition; the noise schedule (how x_t is made during
training, how x_0 is recovered when sampling) belongs to a diffusers scheduler, outside this file, so the module ships
as Hub remote code with torch alone. Its width and depth are the paper's 1024 and 3
(upstream swapped them, building a 1024-deep, 3-wide net).
"""

import math

import torch
from torch import nn

__all__ = ["SetokimDiffusionHead"]


def repeat_noise_draws(rows: torch.Tensor, repeats: int) -> torch.Tensor:
    """`rows` `(N, ...)` -> `(R * N, ...)` with row `r * N + j` = `rows[j]`: the one layout of the generation head's R
    noise draws per hidden image token, shared by its training targets and the conditions it is run on."""
    return rows.repeat(repeats, *([1] * (rows.ndim - 1)))


def timestep_frequencies(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: `(N,)` -> `(N, dim)`, cos then sin."""
    half = dim // 2
    exponents = torch.arange(half, device=timesteps.device, dtype=torch.float32) / half
    angles = timesteps.float()[:, None] * torch.exp(-math.log(max_period) * exponents)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class SetokimZeroInitLinear(nn.Linear):
    """A linear layer that `SetokimPreTrainedModel` initialises to zero (weight and bias)."""


class SetokimTimestepEmbedding(nn.Module):
    """Timestep -> sinusoidal features -> MLP of the head's width."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.linear_1 = nn.Linear(frequency_dim, width)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(width, width)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        frequencies = timestep_frequencies(timesteps, self.frequency_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(frequencies)))


class SetokimAdaLNBlock(nn.Module):
    """Residual MLP block whose normalisation is shifted, scaled and gated by the condition (adaLN).

    The modulation starts at zero, so every block starts as the identity: the usual DiT/MAR start, which trains
    stably from step one.
    """

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), SetokimZeroInitLinear(width, 3 * width))

    def forward(self, hidden: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(condition).chunk(3, dim=-1)
        return hidden + gate * self.mlp(self.norm(hidden) * (1 + scale) + shift)


class SetokimAdaLNOutput(nn.Module):
    """Final adaLN (no affine parameters of its own) and the projection back to the token width; both start at zero,
    so a fresh head predicts 0."""

    def __init__(self, width: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), SetokimZeroInitLinear(width, 2 * width))
        self.linear = SetokimZeroInitLinear(width, out_dim)

    def forward(self, hidden: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(condition).chunk(2, dim=-1)
        return self.linear(self.norm(hidden) * (1 + scale) + shift)


class SetokimDiffusionHead(nn.Module):
    """Denoising MLP over single token vectors (predicts v or eps).

    Args:
        token_dim: width of a SeTok token (what is denoised).
        condition_dim: width of the LLM's hidden states (what conditions it).
        width, depth: the MLP's width and number of adaLN residual blocks.
    """

    def __init__(self, token_dim: int, condition_dim: int, width: int, depth: int):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embedding = SetokimTimestepEmbedding(width)
        self.condition_proj = nn.Linear(condition_dim, width)
        self.blocks = nn.ModuleList([SetokimAdaLNBlock(width) for _ in range(depth)])
        self.output = SetokimAdaLNOutput(width, token_dim)

    def forward(self, noisy_tokens: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """`noisy_tokens` `(N, token_dim)`, `timesteps` `(N,)` (or a scalar), `condition` `(N, condition_dim)` ->
        the prediction `(N, token_dim)`."""
        if noisy_tokens.ndim != 2 or condition.ndim != 2 or noisy_tokens.shape[0] != condition.shape[0]:
            raise ValueError(
                "`noisy_tokens` and `condition` must be `(N, token_dim)` and `(N, condition_dim)` with the same N, got "
                f"{tuple(noisy_tokens.shape)} and {tuple(condition.shape)}."
            )
        timesteps = torch.as_tensor(timesteps, device=noisy_tokens.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(noisy_tokens.shape[0])
        if timesteps.numel() != noisy_tokens.shape[0]:
            raise ValueError(f"`timesteps` must hold 1 or N={noisy_tokens.shape[0]} values, got {timesteps.numel()}.")
        dtype = self.input_proj.weight.dtype
        condition = self.condition_proj(condition.to(dtype)) + self.time_embedding(timesteps)
        hidden = self.input_proj(noisy_tokens.to(dtype))
        for block in self.blocks:
            hidden = block(hidden, condition)
        return self.output(hidden, condition)
