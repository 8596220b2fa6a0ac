"""Setokim's mask decoder for referring segmentation, in the style of SAM's decoder (two-way attention, then a
hypernetwork over upsampled image features).

    prompt tokens (S, m, hidden_size)  the LLM's hidden states at the `<image>` slots it wrote for the referred object
        -> standardised per feature (running statistics, `SetokimPromptStandardization`) -> MLP -> (S, m, D),
        after two learned output tokens [IoU, mask]                                        tokens (S, 2 + m, D)
    patch grid (S, g * g, C)  SeTok's encoder features of the object's image (the same forward's encoding)
        -> Linear -> LayerNorm -> (S, g * g, D), + fixed 2D sine-cosine position embedding (keys only)
    depth x two-way block: tokens self-attend, tokens -> image, MLP on tokens, image -> tokens
    final tokens -> image attention
    image grid (S, D, g, g) -> 2 transposed convs (2x each) -> (S, D / 8, 4g, 4g)
    mask token -> hypernetwork MLP -> (S, D / 8) dynamic weights; mask logits = weights . upsampled features
    IoU token -> MLP -> sigmoid: the predicted IoU of the thresholded mask

The masks are logits at 4 x the patch grid, `4 * grid_size` pixels a side: `4 / patch_size` of the encoder's image
resolution (32 of 32 pixels for a 4-pixel patch; 108 of 384 for SigLIP so400m-patch14-384, whose grid covers the first
378 pixels). A caller compares them with a target at another size after `resize_mask_logits` (bilinear).

Prompts have a variable length m per object: they are padded and the padding is hidden as keys in every attention
(additive masks for eager/sdpa, flash attention's own inputs otherwise), so an object's mask does not depend on the
other objects of its batch.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .clustering_setok import sincos_position_embedding_2d
from .layers_setok import cross_attention_inputs, eager_attention_forward, padding_attention_kwargs

__all__ = ["MASK_UPSCALE", "SetokimMaskDecoder", "SetokimPromptStandardization", "resize_mask_logits"]

MASK_UPSCALE = 4  # mask side / patch grid side: two 2x transposed convolutions
# SAM narrows the two cross-attentions to half the width: the image side is long (g * g keys or queries).
CROSS_ATTENTION_DOWNSAMPLE = 2
HYPERNETWORK_DIVISOR = 8  # channels of the upsampled features = width / 8, as in SAM
# How far each training batch moves the prompts' running statistics (see SetokimPromptStandardization).
PROMPT_STATISTICS_MOMENTUM = 0.05
LAYER_NORM_EPS = 1e-6


def resize_mask_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits `(S, h, w)` -> `(S, H, W)` at `size`, bilinear (float32; unchanged when the size matches)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return nn.functional.interpolate(logits[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


class SetokimMaskDecoderAttention(nn.Module):
    """Multi-head attention with separate query, key and value inputs of width `width`, attending at
    `internal_width` (queries and keys carry position embeddings that the values must not)."""

    def __init__(self, config, width: int, num_heads: int, internal_width: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = internal_width // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(width, internal_width)
        self.k_proj = nn.Linear(width, internal_width)
        self.v_proj = nn.Linear(width, internal_width)
        self.out_proj = nn.Linear(internal_width, width)

    def forward(self, query, key, value, attn_implementation: str | None = None, **attention_kwargs):
        """`query` `(S, T, width)`; `key`, `value` `(S, K, width)` (or `(1, K_total, width)` packed for flash
        cross-attention) -> `(S, T, width)`."""
        batch, length = query.shape[:2]
        kv_shape = (*key.shape[:2], self.num_heads, self.head_dim)
        query = self.q_proj(query).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(key).view(kv_shape).transpose(1, 2)
        value = self.v_proj(value).view(kv_shape).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn_implementation or self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_kwargs.pop("attention_mask", None),
            is_causal=False,
            scaling=self.scaling,
            dropout=0.0,
            **attention_kwargs,
        )
        return self.out_proj(output.reshape(batch, length, self.num_heads * self.head_dim))


class SetokimMaskDecoderMLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (SAM's hypernetwork and IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if index < len(self.layers) - 1:
                hidden = nn.functional.relu(hidden)
        return hidden


class SetokimLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `(S, C, H, W)` feature map, at every pixel."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SetokimPromptStandardization(nn.Module):
    """Standardises each feature of the prompt tokens with running statistics: `(x - running_mean) / sqrt(running_var
    + eps)`, `(S, m, hidden_size)` -> the same shape.

    Why: the slot states share most of their value (every slot starts from the one `<image>` embedding) and what tells
    two expressions apart lies in low-variance features. A fresh projection of raw states learns so slowly that the
    decoder first settles on a mask that ignores the prompt, and the LLM then gets no useful gradient through it (on
    the Fashion-MNIST scenes the decoder never left that state); standardised inputs remove the stall.

    Unlike batch normalisation the output never uses the batch's own statistics, so a prompt's value does not depend
    on the other objects of its batch: in training mode, each forward first folds the real (unpadded) slot states of
    the batch into the running statistics (the first batch sets them, later ones move them by `momentum`; no
    gradient), summed over all processes when torch.distributed runs, so every process and a single process on the
    same global batch keep the same statistics; in eval mode, without gradients, and while the decoder is frozen,
    nothing moves. The buffers are saved with the model.
    """

    def __init__(self, hidden_size: int, momentum: float = PROMPT_STATISTICS_MOMENTUM, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(hidden_size))
        self.register_buffer("running_var", torch.ones(hidden_size))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, track: bool | None = None) -> torch.Tensor:
        """`track`: fold this batch into the statistics first (default: in training mode). The decoder passes False
        while it is frozen, so that a decoder left out of training does not change at all."""
        if self.training if track is None else track:
            self._track(prompts[prompt_mask.bool()].detach().float())
        mean, var = self.running_mean.to(prompts.dtype), self.running_var.to(prompts.dtype)
        return (prompts - mean) / torch.sqrt(var + self.eps)

    @torch.no_grad()
    def _track(self, states: torch.Tensor):
        """`states` `(M, hidden_size)`, this process's real slot states (M may be 0)."""
        moments = torch.cat([states.new_tensor([states.shape[0]]), states.sum(0), states.pow(2).sum(0)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)  # every process runs the decoder in every training step
        count, total, squares = moments[0], *moments[1:].view(2, -1)
        # Tensor arithmetic only, no host read: this runs in every training forward, on an accelerator too. A batch
        # without slot states on any process moves nothing (rate 0); the first that has some sets the statistics.
        seen = (count > 0).to(moments.dtype)
        first = (self.num_batches_tracked == 0).to(moments.dtype)
        rate = (seen * (first + (1 - first) * self.momentum))[None]
        mean = total / count.clamp_min(1)
        var = (squares / count.clamp_min(1) - mean.pow(2)).clamp_min(0)
        self.running_mean.lerp_(mean.to(self.running_mean), rate.to(self.running_mean))
        self.running_var.lerp_(var.to(self.running_var), rate.to(self.running_var))
        self.num_batches_tracked += seen.to(self.num_batches_tracked.dtype)


class SetokimTwoWayBlock(GradientCheckpointingLayer):
    """Post-norm block: the tokens attend to themselves and to the image, an MLP updates them, then the image attends
    to the tokens. Queries and keys get their position embeddings (the initial tokens for the tokens, the 2D sine-cosine
    table for the image) added at every attention; values do not."""

    def __init__(self, config, width: int, num_heads: int, intermediate_size: int):
        super().__init__()
        narrow = width // CROSS_ATTENTION_DOWNSAMPLE
        eps = LAYER_NORM_EPS
        self.self_attn = SetokimMaskDecoderAttention(config, width, num_heads, width)
        self.self_attn_norm = nn.LayerNorm(width, eps=eps)
        self.token_to_image = SetokimMaskDecoderAttention(config, width, num_heads, narrow)
        self.token_to_image_norm = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(width, intermediate_size), ACT2FN["relu"], nn.Linear(intermediate_size, width)
        )
        self.mlp_norm = nn.LayerNorm(width, eps=eps)
        self.image_to_token = SetokimMaskDecoderAttention(config, width, num_heads, narrow)
        self.image_to_token_norm = nn.LayerNorm(width, eps=eps)

    def forward(
        self,
        tokens: torch.Tensor,
        image: torch.Tensor,
        token_pe: torch.Tensor,
        image_pe: torch.Tensor,
        self_attention_kwargs: dict,
        image_to_token_kwargs: dict,
        attn_implementation: str | None = None,
        packed_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`tokens` `(S, T, D)`, `image` `(S, N, D)`, `token_pe` like `tokens`, `image_pe` `(1, N, D)` -> the updated
        `(tokens, image)`. `self_attention_kwargs` hide padded tokens as keys of the token self-attention and
        `image_to_token_kwargs` as keys of the image -> token attention; under flash attention the real tokens
        (`packed_tokens`, `(S, T)` bool) are packed into one sequence for the latter instead."""
        impl = attn_implementation
        query = tokens + token_pe
        tokens = self.self_attn_norm(tokens + self.self_attn(query, query, tokens, impl, **self_attention_kwargs))
        image_keys = image + image_pe
        attended = self.token_to_image(tokens + token_pe, image_keys, image, impl)
        tokens = self.token_to_image_norm(tokens + attended)
        tokens = self.mlp_norm(tokens + self.mlp(tokens))
        keys, values = tokens + token_pe, tokens
        if packed_tokens is not None:
            keys, values = keys[packed_tokens][None], values[packed_tokens][None]
        attended = self.image_to_token(image_keys, keys, values, impl, **image_to_token_kwargs)
        image = self.image_to_token_norm(image + attended)
        return tokens, image


class SetokimMaskDecoder(nn.Module):
    """Mask decoder of referring segmentation: prompt tokens and an image's encoder patch grid -> mask logits and the
    predicted IoU. See the module docstring for the layout; sizes come from `SetokimConfig`:

    - `mask_decoder_width` (D), `mask_decoder_depth` (two-way blocks), `mask_decoder_heads`,
      `mask_decoder_intermediate_size` (the blocks' MLP);
    - the prompt width is `text_config.hidden_size`, the patch width the vision encoder's `hidden_size`, and the grid
      `vision_config.grid_size` (g): masks are `(4g, 4g)`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        width = config.mask_decoder_width
        heads = config.mask_decoder_heads
        hidden_size = config.text_config.hidden_size
        self.grid_size = config.vision_config.grid_size
        eps = LAYER_NORM_EPS
        self.prompt_norm = SetokimPromptStandardization(hidden_size)
        self.prompt_proj = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, width))
        self.image_proj = nn.Linear(config.vision_config.vision_config.hidden_size, width)
        self.image_norm = nn.LayerNorm(width, eps=eps)
        self.output_tokens = nn.Embedding(2, width)  # 0: IoU token, 1: mask token
        self.blocks = nn.ModuleList(
            SetokimTwoWayBlock(config, width, heads, config.mask_decoder_intermediate_size)
            for _ in range(config.mask_decoder_depth)
        )
        self.final_attn = SetokimMaskDecoderAttention(config, width, heads, width // CROSS_ATTENTION_DOWNSAMPLE)
        self.final_norm = nn.LayerNorm(width, eps=eps)
        channels = width // HYPERNETWORK_DIVISOR
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(width, width // 4, kernel_size=2, stride=2),
            SetokimLayerNorm2d(width // 4, eps=eps),
            nn.GELU(),
            nn.ConvTranspose2d(width // 4, channels, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.hypernetwork = SetokimMaskDecoderMLP(width, width, channels, num_layers=3)
        self.iou_head = SetokimMaskDecoderMLP(width, width, 1, num_layers=3)

    @property
    def mask_size(self) -> int:
        """Side of the predicted masks: `MASK_UPSCALE` x the patch grid."""
        return MASK_UPSCALE * self.grid_size

    def forward(
        self, prompt_tokens: torch.Tensor, prompt_mask: torch.Tensor, patch_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`prompt_tokens` `(S, m_max, hidden_size)` padded, `prompt_mask` `(S, m_max)` (True/1 for real tokens),
        `patch_features` `(S, g * g, C)` (each object's image) -> mask logits `(S, 4g, 4g)` and IoU predictions `(S,)`
        in [0, 1]. S = 0 runs every layer on empty tensors (zero gradients for a process without objects)."""
        num_objects = prompt_tokens.shape[0]
        grid = self.grid_size
        if patch_features.shape[:2] != (num_objects, grid * grid) or prompt_mask.shape != prompt_tokens.shape[:2]:
            raise ValueError(
                f"The mask decoder needs `prompt_tokens` (S, m, hidden), `prompt_mask` (S, m) and `patch_features` "
                f"(S, {grid * grid}, C); got {tuple(prompt_tokens.shape)}, {tuple(prompt_mask.shape)} and "
                f"{tuple(patch_features.shape)}."
            )
        dtype = self.image_proj.weight.dtype
        # The statistics move only while the decoder itself trains (a frozen decoder stays as it was), under the
        # condition on which the model runs an idle decoder on a process without objects: their all-reduce is
        # collective, so every process must reach it.
        track = self.training and torch.is_grad_enabled() and self.prompt_proj[0].weight.requires_grad
        prompts = self.prompt_proj(self.prompt_norm(prompt_tokens.to(dtype), prompt_mask, track))
        learned = self.output_tokens.weight[None].expand(num_objects, -1, -1)
        tokens = torch.cat([learned, prompts], dim=1)  # (S, 2 + m, D)
        token_mask = torch.cat([prompt_mask.new_ones(num_objects, 2), prompt_mask], dim=1).bool()
        image = self.image_norm(self.image_proj(patch_features.to(dtype)))  # (S, N, D)
        image_pe = sincos_position_embedding_2d(grid, grid, image.shape[-1], image.device).to(dtype)[None]

        # Empty batches take the eager path: flash attention's packing needs at least one sequence.
        impl = self.config._attn_implementation if num_objects else "eager"
        self_kwargs = padding_attention_kwargs(token_mask, impl, dtype)
        # Only the kwargs: the token keys change in every block, and are packed there under flash attention.
        _, cross_kwargs = cross_attention_inputs(tokens[..., :0], token_mask, grid * grid, impl)
        packed = None if "attention_mask" in cross_kwargs else token_mask
        token_pe = tokens
        for block in self.blocks:
            tokens, image = block(tokens, image, token_pe, image_pe, self_kwargs, cross_kwargs, impl, packed)
        tokens = self.final_norm(tokens + self.final_attn(tokens + token_pe, image + image_pe, image, impl))

        grid_features = image.transpose(1, 2).reshape(num_objects, image.shape[-1], grid, grid)
        features = self.upscale(grid_features)  # (S, D / 8, 4g, 4g)
        weights = self.hypernetwork(tokens[:, 1])  # (S, D / 8)
        masks = torch.einsum("sc,schw->shw", weights, features)
        iou = self.iou_head(tokens[:, 0]).squeeze(-1).sigmoid()
        return masks, iou
