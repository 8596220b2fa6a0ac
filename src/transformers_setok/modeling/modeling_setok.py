"""SeTok: a vision tokenizer that turns an image into a variable number of semantic tokens.

pixels -> vision encoder -> patch grid (B, N = h * w, C) -> + 2D sine-cosine position embedding
       -> token cluster (density peaks; L_b clusters per image, hard assignment)
       -> token merger (attention inside each cluster, mean per cluster, attention across clusters)
       -> tokens (B, L_max, token_dim) with an attention mask
tokens -> detokenizer (query grid cross-attends to the tokens, pixel decoder) -> pixels
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .clustering_setok import dpc_knn_cluster, iterative_cluster, sincos_position_embedding_2d
from .configuration_setok import SetokConfig
from .layers_setok import (
    SetokTransformerLayer,
    cross_attention_inputs,
    padding_attention_kwargs,
    segment_attention_kwargs,
)
from .loading_setok import check_model_type, initialize_native_submodels
from .losses_setok import (
    TEXT_TOWERS,
    SetokConceptContrast,
    SetokPatchDiscriminator,
    hinge_generator_loss,
    reconstruction_loss,
)


@dataclass
class SetokModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, max_num_tokens, token_dim)`):
        The SeTok tokens of each image, padded to the largest token count of the batch (padding rows are zero).
    attention_mask (`torch.LongTensor` of shape `(batch_size, max_num_tokens)`):
        1 for real tokens, 0 for padding.
    num_tokens (`torch.LongTensor` of shape `(batch_size,)`):
        Token (cluster) count of each image.
    cluster_assignment (`torch.LongTensor` of shape `(batch_size, grid_height, grid_width)`):
        Token index of every encoder patch.
    patch_features (`torch.FloatTensor` of shape `(batch_size, grid_height * grid_width, hidden_size)`, *optional*):
        The encoder's patch features (before the position embedding), when `output_patch_features=True`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The vision encoder's hidden states (its embeddings, then each layer's output), when
        `output_hidden_states=True` (or `config.output_hidden_states`).
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        The vision encoder's attention weights, one `(batch_size, num_heads, seq_len, seq_len)` tensor per layer, when
        `output_attentions=True` (or `config.output_attentions`); the eager attention implementation provides them.
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    num_tokens: torch.LongTensor | None = None
    cluster_assignment: torch.LongTensor | None = None
    patch_features: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SetokReconstructionOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): the weighted sum of the reconstruction, perceptual and concept terms that
        were computed. The adversarial `generator_loss` is not part of it: its start and its (adaptive) weight are
        training schedule, applied by the trainer ([`SetokTrainer`]).
    reconstruction_loss, perceptual_loss, generator_loss, concept_loss (`torch.FloatTensor`, *optional*):
        The unweighted stage-1 loss terms (spec 1.6), each present when computed.
    footprint_loss (`torch.FloatTensor`, *optional*): with `config.detokenizer_token_footprint`, the cross-entropy
        of the detokenizer's footprint against the cluster each patch was merged into (unweighted).
    reconstruction (`torch.FloatTensor` of shape `(batch_size, 3, size, size)`):
        Decoded pixels, normalised like the processor's output; `size = grid * decoder_patch_size`.
    last_hidden_state, attention_mask, num_tokens, cluster_assignment, hidden_states, attentions: as in
        [`SetokModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    perceptual_loss: torch.FloatTensor | None = None
    generator_loss: torch.FloatTensor | None = None
    concept_loss: torch.FloatTensor | None = None
    footprint_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    num_tokens: torch.LongTensor | None = None
    cluster_assignment: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class SetokPreTrainedModel(PreTrainedModel):
    config: SetokConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SetokTransformerLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SetokDetokenizer):
            init.normal_(module.query_embeddings, std=self.config.initializer_range)
        elif isinstance(module, SetokConceptContrast):
            init.constant_(module.logit_scale, math.log(1 / self.config.contrastive_temperature_init))

    def initialize_weights(self):
        # The encoders first, by their own classes' rules (what their constructors run): transformers' custom-code
        # path would otherwise skip their parameter-less blocks, and missing weights would get another init.
        initialize_native_submodels(self)
        super().initialize_weights()

    def freeze_encoders(self):
        """Freeze the vision encoder (when `config.freeze_vision_encoder`) and the concept contrast's text encoder."""
        for module in self.modules():
            if isinstance(module, SetokModel) and self.config.freeze_vision_encoder:
                module.vision_model.requires_grad_(False)
            elif isinstance(module, SetokConceptContrast):
                module.text_encoder.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # transformers only warns when the checkpoint is of another model type, and returns random weights.
        check_model_type(pretrained_model_name_or_path, cls.config_class.model_type, class_name=cls.__name__, **kwargs)
        # Loading swaps every parameter for a new trainable one, which would silently unfreeze the encoders.
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_encoders()
        return loaded

    @classmethod
    def from_pretrained_encoders(
        cls, vision_model_name_or_path: str | None, text_model_name_or_path: str | None = None, **config_kwargs
    ):
        """Build a SeTok around pretrained encoders; every SeTok part (merger, detokenizer, ...) is freshly initialised.

        `vision_model_name_or_path` may name a vision model (SigLIP/CLIP vision, ViT) or a dual encoder (SigLIP,
        CLIP), whose vision tower is taken; `None` trains a fresh encoder described by `vision_config` in
        `config_kwargs`. `text_model_name_or_path` optionally names the frozen text encoder of the concept contrast
        (for example all-MiniLM-L6-v2, or a SigLIP checkpoint's text tower).

        ```python
        >>> model = SetokForImageReconstruction.from_pretrained_encoders("google/siglip-so400m-patch14-384")
        ```
        """
        if text_model_name_or_path and not cls._has_concept_contrast:
            raise ValueError(f"`text_model_name_or_path` needs a model with the concept contrast, not {cls.__name__}.")
        if vision_model_name_or_path is None and "vision_config" not in config_kwargs:
            raise ValueError(
                "Without `vision_model_name_or_path` the vision encoder is trained from scratch: describe it with "
                "`vision_config=...`."
            )
        pretrained = {}  # sub-config key -> checkpoint
        if vision_model_name_or_path:
            pretrained["vision_config"] = vision_model_name_or_path
        if text_model_name_or_path:
            pretrained["text_config"] = text_model_name_or_path
        for key, name_or_path in pretrained.items():
            config_kwargs[key] = _tower_config(name_or_path, key)
        model = cls(SetokConfig(**config_kwargs))
        for key, name_or_path in pretrained.items():
            target = model.base_model.vision_model if key == "vision_config" else model.concept_contrast.text_encoder
            config = getattr(model.config, key)
            weights = TEXT_TOWERS.get(config.model_type, AutoModel).from_pretrained(name_or_path, config=config)
            missing = target.load_state_dict(weights.state_dict(), strict=False).missing_keys
            if missing:
                raise ValueError(f"{name_or_path!r} lacks weights the encoder needs: {missing[:5]}...")
        return model


def _tower_config(name_or_path: str, key: str):
    """The config of `name_or_path`, or its `key` sub-config when it names a dual encoder."""
    config = AutoConfig.from_pretrained(name_or_path)
    return getattr(config, key, None) or config


class SetokTokenMerger(nn.Module):
    """Merges each cluster of patches into one token, then lets the tokens of an image see each other."""

    def __init__(self, config: SetokConfig):
        super().__init__()
        self.config = config
        width, heads, ffn, drop = (
            config.merger_hidden_size,
            config.merger_num_attention_heads,
            config.merger_intermediate_size,
            config.merger_dropout,
        )
        self.input_proj = nn.Linear(config.vision_config.hidden_size, width)
        self.intra_layers = nn.ModuleList(
            [SetokTransformerLayer(config, width, heads, ffn, drop) for _ in range(config.merger_num_intra_layers)]
        )
        self.inter_layers = nn.ModuleList(
            [SetokTransformerLayer(config, width, heads, ffn, drop) for _ in range(config.merger_num_inter_layers)]
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if config.merger_output_norm else nn.Identity()
        self.output_proj = nn.Linear(width, config.token_dim)

    def forward(self, patch_features, assignment, num_clusters):
        """`patch_features` `(B, N, C)`, `assignment` `(B, N)`, `num_clusters` `(B,)` -> tokens `(B, L, D)`, mask."""
        hidden = self.input_proj(patch_features)
        impl = self.config._attn_implementation

        # Intra-cluster encoder. Sorting patches by cluster makes every cluster one contiguous run, which flash
        # attention needs; eager/sdpa see the same block-diagonal pattern as a mask.
        segments, order = assignment.sort(dim=-1, stable=True)
        hidden = hidden.gather(1, order[..., None].expand_as(hidden))
        intra_kwargs = segment_attention_kwargs(segments, impl, hidden.dtype)
        for layer in self.intra_layers:
            hidden = layer(hidden, self_attention_kwargs=intra_kwargs)

        # Mean of each cluster's patches, as one batched matmul (deterministic, unlike scatter_add on GPU).
        max_tokens = int(num_clusters.max())
        membership = (segments[:, None, :] == torch.arange(max_tokens, device=segments.device)[None, :, None]).to(
            hidden.dtype
        )
        tokens = membership @ hidden / membership.sum(-1, keepdim=True).clamp_min(1)

        # Inter-cluster encoder over the tokens of each image; padded tokens are masked as keys and zeroed.
        token_mask = torch.arange(max_tokens, device=segments.device)[None, :] < num_clusters[:, None]
        inter_kwargs = padding_attention_kwargs(token_mask, impl, tokens.dtype)
        for layer in self.inter_layers:
            tokens = layer(tokens, self_attention_kwargs=inter_kwargs)
        tokens = self.output_proj(self.norm(tokens)) * token_mask[..., None].to(tokens.dtype)
        return tokens, token_mask.long()


class SetokModel(SetokPreTrainedModel):
    """Vision encoder + position embedding + token cluster + token merger."""

    _has_concept_contrast = False

    def __init__(self, config: SetokConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.merger = SetokTokenMerger(config)
        self.post_init()
        self.freeze_encoders()

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode: its dropout (ViT, say) would otherwise perturb the features.
        super().train(mode)
        if self.config.freeze_vision_encoder:
            self.vision_model.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        """The vision encoder's input embedding (SigLIP's patch embedding), as `SiglipVisionModel` returns it."""
        return self.vision_model.get_input_embeddings()

    def get_patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder patch features `(B, h * w, C)` at `config.vision_feature_layer`; leading CLS/register tokens are
        dropped for encoders that have them (SigLIP has none)."""
        return self._select_patch_features(self._encode(pixel_values, output_attentions=False).hidden_states)

    def _encode(self, pixel_values: torch.Tensor, output_attentions: bool):
        return self.vision_model(
            pixel_values=pixel_values, output_hidden_states=True, output_attentions=output_attentions, return_dict=True
        )

    def _select_patch_features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        features = hidden_states[self.config.vision_feature_layer]
        num_prefix = features.shape[1] - self.config.num_patches
        if num_prefix < 0:
            raise ValueError(
                f"The vision encoder returned {features.shape[1]} tokens, fewer than its "
                f"{self.config.grid_size}x{self.config.grid_size} patch grid."
            )
        return features[:, num_prefix:]

    def embed_positions(self, patch_features: torch.Tensor) -> torch.Tensor:
        """Adds the scaled 2D sine-cosine position embedding to `(B, h * w, C)` patch features."""
        grid = self.config.grid_size
        position = sincos_position_embedding_2d(grid, grid, patch_features.shape[-1], patch_features.device)
        return patch_features + self.config.position_embedding_scale * position.to(patch_features.dtype)

    def cluster_patches(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token cluster on position-embedded features `(B, N, C)` -> assignment `(B, N)`, counts `(B,)`."""
        config = self.config
        if config.cluster_method == "iterative":
            return iterative_cluster(
                features,
                k=config.cluster_k,
                max_num_clusters=config.max_num_clusters or config.cluster_fallback_num_clusters,
                bandwidth_scale=config.iterative_bandwidth_scale,
                stop_mass=config.iterative_stop_mass,
                chunk_size=config.cluster_chunk_size,
            )
        return dpc_knn_cluster(
            features,
            k=config.cluster_k,
            threshold=config.cluster_threshold,
            fallback_num_clusters=config.cluster_fallback_num_clusters,
            max_num_clusters=config.max_num_clusters,
            chunk_size=config.cluster_chunk_size,
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_patch_features: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SetokModelOutput:
        r"""
        pixel_values (`(B, 3, H, W)`): images at the encoder's image size, as the image processor returns them.
        output_patch_features (`bool`, defaults to `False`): also return the clustered patch features.
        output_attentions, output_hidden_states (`bool`, *optional*): also return the vision encoder's attention
            weights / hidden states; default to the config's `output_attentions` / `output_hidden_states`.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        _check_pixel_values(pixel_values, config.image_size, "pixel_values")
        pixel_values = pixel_values.to(self.dtype)
        encoded = self._encode(pixel_values, output_attentions=bool(output_attentions))
        patch_features = self._select_patch_features(encoded.hidden_states)
        features = self.embed_positions(patch_features)
        assignment, num_clusters = self.cluster_patches(features.detach().float())
        tokens, token_mask = self.merger(features, assignment, num_clusters)
        return SetokModelOutput(
            last_hidden_state=tokens,
            attention_mask=token_mask,
            num_tokens=num_clusters,
            cluster_assignment=assignment.view(-1, config.grid_size, config.grid_size),
            patch_features=patch_features if output_patch_features else None,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=encoded.attentions if output_attentions else None,
        )


class SetokDetokenizer(nn.Module):
    """Decodes tokens back to pixels: a learned query per output patch attends to itself and (cross) to the tokens,
    a pixel decoder refines the grid, and a linear head emits `p x p x 3` values per patch."""

    def __init__(self, config: SetokConfig):
        super().__init__()
        self.config = config
        width, heads, ffn = (
            config.detokenizer_hidden_size,
            config.detokenizer_num_attention_heads,
            config.detokenizer_intermediate_size,
        )
        self.token_proj = nn.Linear(config.token_dim, width)
        self.footprint_head = (
            nn.Linear(config.token_dim, config.num_patches) if config.detokenizer_token_footprint else None
        )
        self.query_embeddings = nn.Parameter(torch.empty(config.num_patches, width))
        self.query_layers = nn.ModuleList(
            [
                SetokTransformerLayer(config, width, heads, ffn, cross_attention_size=width)
                for _ in range(config.detokenizer_num_query_layers)
            ]
        )
        self.decoder_layers = nn.ModuleList(
            [SetokTransformerLayer(config, width, heads, ffn) for _ in range(config.detokenizer_num_decoder_layers)]
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.pixel_head = nn.Linear(width, config.decoder_patch_size**2 * 3)

    def token_footprint(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor | None:
        """Footprint logits `(B, L, g * g)`: how strongly token `l` claims output patch `n`, compared over the
        image's tokens (padded ones at the dtype's minimum). `None` without a footprint head."""
        if self.footprint_head is None:
            return None
        logits = self.footprint_head(tokens)
        return logits.masked_fill(~token_mask.bool()[..., None], torch.finfo(logits.dtype).min)

    def forward(
        self, tokens: torch.Tensor, token_mask: torch.Tensor, footprint: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`tokens` `(B, L, token_dim)`, `token_mask` `(B, L)` -> pixels `(B, 3, g * p, g * p)`. `footprint` is
        `token_footprint(tokens, token_mask)` when the caller already has it (stage 1 also scores it)."""
        grid, patch = self.config.grid_size, self.config.decoder_patch_size
        memory = self.token_proj(tokens)
        position = sincos_position_embedding_2d(grid, grid, memory.shape[-1], memory.device).to(memory.dtype)
        queries = (self.query_embeddings.to(memory.dtype) + position).expand(memory.shape[0], -1, -1)
        if footprint is None:
            footprint = self.token_footprint(tokens, token_mask)
        if footprint is not None:
            # Each patch's query starts from the tokens that cover it by the footprint: `(B, g * g, width)` (the
            # softmax in float32, as in attention).
            queries = queries + footprint.float().softmax(dim=1).transpose(1, 2).to(memory.dtype) @ memory
        memory, cross_kwargs = cross_attention_inputs(
            memory, token_mask, queries.shape[1], self.config._attn_implementation
        )
        for layer in self.query_layers:
            queries = layer(queries, memory, cross_attention_kwargs=cross_kwargs)
        for layer in self.decoder_layers:
            queries = layer(queries)
        patches = self.pixel_head(self.norm(queries))
        return _unpatchify(patches, grid, patch)


def _unpatchify(patches: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """`(B, g * g, p * p * 3)` -> `(B, 3, g * p, g * p)`."""
    batch = patches.shape[0]
    pixels = patches.view(batch, grid, grid, patch, patch, 3).permute(0, 5, 1, 3, 2, 4)
    return pixels.reshape(batch, 3, grid * patch, grid * patch)


class SetokForImageReconstruction(SetokPreTrainedModel):
    """SeTok with its detokenizer and the stage-1 losses: reconstruction (L1/MSE), optional perceptual and PatchGAN
    terms, and the concept contrast against a frozen text encoder (when `config.text_config` is set).

    The forward computes the losses that depend only on its own inputs and outputs. With a discriminator that
    includes the generator's adversarial term against the current discriminator (`generator_loss`), returned
    unweighted and outside `loss`: when it starts, its VQGAN adaptive weight (taken at [`get_last_layer`]) and the
    discriminator's own loss and step are training schedule, which [`SetokTrainer`] applies. The PatchGAN
    discriminator lives in `self.discriminator` (saved with the model); keep its parameters out of the generator's
    optimiser. A perceptual network (any module mapping images to features) is attached with
    `set_perceptual_network`; it is not saved with the model.
    """

    _has_concept_contrast = True

    def __init__(self, config: SetokConfig):
        super().__init__(config)
        self.model = SetokModel(config)
        self.detokenizer = SetokDetokenizer(config)
        self.discriminator = (
            SetokPatchDiscriminator(config.discriminator_channels, config.discriminator_num_layers)
            if config.use_discriminator
            else None
        )
        self.concept_contrast = SetokConceptContrast(config) if config.text_config is not None else None
        self._perceptual = []
        self.post_init()
        self.freeze_encoders()

    def set_perceptual_network(self, network: nn.Module | None):
        """Use `network` (images -> features, frozen by you) for the perceptual term, weighted by
        `config.perceptual_loss_weight`."""
        self._perceptual = [] if network is None else [network]

    def get_input_embeddings(self) -> nn.Module:
        """The vision encoder's input embedding (SigLIP's patch embedding)."""
        return self.model.get_input_embeddings()

    def get_last_layer(self) -> nn.Parameter:
        """The decoder's last layer (the weight of the detokenizer's pixel head), where VQGAN's adaptive weight
        compares the gradients of the reconstruction and adversarial terms."""
        return self.detokenizer.pixel_head.weight

    def reconstruction_target(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` as the reconstruction is compared with them (and the discriminator sees real images):
        float32, resized (bilinear, antialiased) to `config.reconstruction_size` when they differ."""
        return self._target(pixel_values, "pixel_values")

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        target_pixel_values: torch.Tensor | None = None,
        concept_input_ids: torch.Tensor | None = None,
        concept_attention_mask: torch.Tensor | None = None,
        concept_targets: torch.Tensor | None = None,
        return_loss: bool = True,
        return_generator_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SetokReconstructionOutput:
        r"""
        pixel_values (`(B, 3, H, W)`): processed images.
        target_pixel_values (`(B, 3, H', W')`, *optional*): reconstruction target; defaults to `pixel_values`.
            Resized to the reconstruction size when it differs.
        concept_input_ids, concept_attention_mask (`(U, T)`, *optional*): tokenised concept phrases or captions.
        concept_targets (`(B, U)`, *optional*): 1 where text `u` describes image `b`. Defaults to the identity
            when `U == B` (one caption per image).
        return_loss (`bool`, defaults to `True`): compute the losses.
        return_generator_loss (`bool`, *optional*): compute the generator's adversarial term (the discriminator's
            weights enter as constants); defaults to whether the model has a discriminator. A trainer turns it off
            before the GAN starts and in evaluation.
        output_attentions, output_hidden_states (`bool`, *optional*): as in [`SetokModel`].
        """
        config = self.config
        if return_generator_loss is None:
            return_generator_loss = self.discriminator is not None
        elif return_generator_loss and self.discriminator is None:
            raise ValueError(
                "This model has no discriminator for the generator loss: build it with `use_discriminator=True`."
            )
        encoded = self.model(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        footprint = self.detokenizer.token_footprint(encoded.last_hidden_state, encoded.attention_mask)
        reconstruction = self.detokenizer(encoded.last_hidden_state, encoded.attention_mask, footprint=footprint)
        terms = {}
        if return_loss:
            if target_pixel_values is not None and target_pixel_values.shape[:1] != pixel_values.shape[:1]:
                raise ValueError(
                    f"`target_pixel_values` must hold one image per input image ({pixel_values.shape[0]}), "
                    f"got {target_pixel_values.shape[0]}."
                )
            target = self._target(pixel_values if target_pixel_values is None else target_pixel_values, "target")
            reconstruction_f = reconstruction.float()
            terms["reconstruction_loss"] = reconstruction_loss(reconstruction_f, target, config.reconstruction_loss)
            weighted = config.reconstruction_loss_weight * terms["reconstruction_loss"]
            if footprint is not None:
                # Which token each patch was merged into is the clustering's own answer: `(B, L, N)` vs `(B, N)`.
                assignment = encoded.cluster_assignment.flatten(1)
                terms["footprint_loss"] = nn.functional.cross_entropy(footprint.float(), assignment)
                weighted = weighted + config.footprint_loss_weight * terms["footprint_loss"]
            if self._perceptual and config.perceptual_loss_weight > 0:
                network = self._perceptual[0]
                terms["perceptual_loss"] = nn.functional.mse_loss(network(reconstruction_f), network(target))
                weighted = weighted + config.perceptual_loss_weight * terms["perceptual_loss"]
            if return_generator_loss:
                # The discriminator's weights enter as constants: the generator's loss must not train it.
                frozen = {name: param.detach() for name, param in self.discriminator.named_parameters()}
                fake_logits = torch.func.functional_call(self.discriminator, frozen, (reconstruction_f,))
                terms["generator_loss"] = hinge_generator_loss(fake_logits)
            if concept_input_ids is not None:
                terms["concept_loss"] = self._concept_loss(
                    encoded, concept_input_ids, concept_attention_mask, concept_targets
                )
                weighted = weighted + config.concept_loss_weight * terms["concept_loss"]
            terms["loss"] = weighted
        return SetokReconstructionOutput(
            **terms,
            reconstruction=reconstruction,
            last_hidden_state=encoded.last_hidden_state,
            attention_mask=encoded.attention_mask,
            num_tokens=encoded.num_tokens,
            cluster_assignment=encoded.cluster_assignment,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )

    def _target(self, pixels: torch.Tensor, name: str | None) -> torch.Tensor:
        if name is not None:
            _check_pixel_values(pixels, None, f"{name}_pixel_values")
        size = self.config.reconstruction_size
        pixels = pixels.float()
        if pixels.shape[-2:] != (size, size):
            pixels = nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        return pixels

    def _concept_loss(self, encoded, input_ids, attention_mask, targets):
        if self.concept_contrast is None:
            raise ValueError("`concept_input_ids` were given but the model has no text encoder (`text_config`).")
        batch = encoded.last_hidden_state.shape[0]
        for name, value in (("concept_input_ids", input_ids), ("concept_attention_mask", attention_mask)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
        if targets is not None and not isinstance(targets, torch.Tensor):
            raise TypeError(f"`concept_targets` must be a torch.Tensor, got {type(targets).__name__}.")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"`concept_input_ids` must be (num_texts, length), got {tuple(input_ids.shape)}.")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if attention_mask.shape != input_ids.shape:
            raise ValueError("`concept_attention_mask` must have the shape of `concept_input_ids`.")
        if targets is None:
            if input_ids.shape[0] != batch:
                raise ValueError(
                    f"`concept_targets` (images x texts) is required when the number of texts ({input_ids.shape[0]}) "
                    f"differs from the number of images ({batch})."
                )
            targets = torch.eye(batch, device=input_ids.device)
        if targets.shape != (batch, input_ids.shape[0]):
            raise ValueError(
                f"`concept_targets` must be (num_images, num_texts) = {(batch, input_ids.shape[0])}, "
                f"got {tuple(targets.shape)}."
            )
        if not (targets.sum(0) > 0).all():
            raise ValueError("Every concept text needs at least one image in `concept_targets`.")
        return self.concept_contrast(
            encoded.last_hidden_state, encoded.attention_mask, input_ids, attention_mask, targets
        )


def _check_pixel_values(pixel_values, image_size: int | None, name: str):
    """Reject what would otherwise fail deep inside (or silently produce NaN) with an error naming the argument."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor (B, 3, H, W), got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4 or pixel_values.shape[0] == 0 or pixel_values.shape[1] != 3:
        raise ValueError(f"`{name}` must have shape (B >= 1, 3, H, W), got {tuple(pixel_values.shape)}.")
    if not pixel_values.is_floating_point():
        raise TypeError(f"`{name}` must be floating point (use the image processor), got {pixel_values.dtype}.")
    if image_size is not None and pixel_values.shape[-2:] != (image_size, image_size):
        raise ValueError(
            f"`{name}` must be {image_size}x{image_size} (the encoder's image size), got "
            f"{tuple(pixel_values.shape[-2:])}; resize with SetokImageProcessor."
        )
    if not torch.isfinite(pixel_values).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")


__all__ = [
    "SetokForImageReconstruction",
    "SetokModel",
    "SetokModelOutput",
    "SetokPreTrainedModel",
    "SetokReconstructionOutput",
]
