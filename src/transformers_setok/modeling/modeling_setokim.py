"""Setokim: a causal LM that reads images as SeTok tokens.

    pixels -> SeTok (variable token count L_i per image) -> 2-layer GELU projector -> LLM embedding width
    text   -> [Img] <image> x L_i [/Img] ... : the projected tokens replace the <image> placeholders in order

Each image contributes exactly its own token count, so the placeholders can only be expanded once SeTok has run.
`get_image_features` returns the per-image features as a list; `forward` and `generate` take them back through
`mm_encoder_outputs={"image": ...}`, so an image is encoded once even though its count decides the prompt length.
`generate` also takes a plain prompt, one `<image>` per image, with `pixel_values`, as every transformers VLM does:
it encodes the images once, expands the placeholders (`placeholders_setokim.py`) and returns sequences that begin
with the caller's own `input_ids`.

Generation (`config.use_generation_head`), MAR style: an image the model draws is a run of `<image>` targets between
`[Img]` and `[/Img]`. Target positions named in `masked_image_tokens` keep the `<image>` embedding (the mask
embedding) instead of receiving a token; the LLM's hidden state at each of them conditions `generation_head`, a
diffusion MLP that denoises that position's SeTok token, and `image_decoder` (SeTok's detokenizer) turns the drawn
tokens into pixels. The noise schedule and the sampling loop come from diffusers, outside this file
(`transformers_setok.generation`, `transformers_setok.pipelines`).

Referring segmentation (`config.use_mask_decoder`): the answer about a referred object holds `[Img] <image> x m [/Img]`
(m chosen by the LLM, as when it draws). Those positions, named in `segmentation_prompts`, keep the `<image>`
embedding like the generation targets; the LLM's hidden states there are the object's prompt tokens, and
`mask_decoder` (`mask_decoder_setokim.py`) turns them, with the encoder's patch grid of the object's image from the same
forward's SeTok run (`get_image_features(...).patch_features`), into mask logits and a predicted IoU.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .compat_setokim import CACHE_OUTPUT_FIELD, cache_kwargs, cache_of, resolve_cache
from .configuration_setokim import SetokimConfig
from .diffusion_head_setokim import SetokimDiffusionHead, SetokimZeroInitLinear, repeat_noise_draws
from .loading_setok import check_model_type, initialize_native_submodels
from .losses_setok import MaskLossTerms, check_target_masks, mask_losses
from .mask_decoder_setokim import SetokimMaskDecoder, SetokimPromptStandardization
from .modeling_setok import SetokDetokenizer, SetokModel
from .placeholders_setokim import expand_image_placeholders, image_blocks


@dataclass
class SetokimImageFeatures(BaseModelOutputWithPooling):
    r"""
    What [`SetokimModel.get_image_features`] returns.

    last_hidden_state (`torch.FloatTensor` of shape `(num_images, max_num_tokens, token_dim)`):
        The SeTok tokens of each image, padded (before the projector).
    pooler_output (`list[torch.FloatTensor]`):
        One `(n_i, hidden_size)` tensor of projected tokens per image.
    patch_features (`torch.FloatTensor` of shape `(num_images, grid_size ** 2, vision_hidden_size)`, *optional*):
        The vision encoder's patch grid (the layer SeTok clusters, before the position embedding), raster order; for a
        model with a mask decoder (`config.use_mask_decoder`), which reads it.
    cluster_assignment (`torch.LongTensor` of shape `(num_images, grid_size, grid_size)`, *optional*):
        The token each encoder patch belongs to (SeTok's clusters): which tokens cover a referred object.
    """

    patch_features: torch.FloatTensor | None = None
    cluster_assignment: torch.LongTensor | None = None


@dataclass
class SetokimMaskPrediction(ModelOutput):
    r"""
    pred_masks (`torch.FloatTensor` of shape `(S, 4 * grid_size, 4 * grid_size)`):
        Mask logits of the S objects at the decoder's resolution (`resize_mask_logits` brings them to any size).
    iou_scores (`torch.FloatTensor` of shape `(S,)`):
        The IoU the decoder predicts for each thresholded mask (logit > 0), in [0, 1].
    """

    pred_masks: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None


@dataclass
class SetokimModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.FloatTensor` of shape `(total_image_tokens, hidden_size)`, *optional*):
        The projected SeTok tokens of all images of the batch, in placeholder order.
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        What `get_image_features` returned for the batch's images (`pooler_output`: one `(n_i, hidden_size)` tensor
        per image), whether this forward encoded them or was given them.
    """

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class SetokimCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    image_hidden_states (`torch.FloatTensor` of shape `(total_image_tokens, hidden_size)`, *optional*):
        The projected SeTok tokens of all images of the batch, in placeholder order.
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        What `get_image_features` returned for the batch's images.
    diffusion_prediction (`torch.FloatTensor` of shape `(R * num_masked, token_dim)`, *optional*):
        The generation head's output for `noisy_image_tokens` (the velocity or the noise, after
        `config.diffusion_prediction_type`), when they were given.
    pred_masks (`torch.FloatTensor` of shape `(S, 4 * grid_size, 4 * grid_size)`, *optional*):
        Mask logits of the S referred objects of `segmentation_prompts` (row-major order), when they were given.
    iou_scores (`torch.FloatTensor` of shape `(S,)`, *optional*):
        The decoder's predicted IoU of each thresholded mask.
    mask_loss (`torch.FloatTensor`, *optional*):
        With `target_masks`: the mean over the S objects of `mask_focal_weight x focal + mask_dice_weight x dice +
        mask_iou_weight x the IoU head's squared error` (weights from the config), at each target's resolution. Not
        part of `loss` (the LM loss): the trainer weighs the tasks against each other, as for the diffusion loss.
    mask_focal_loss, mask_dice_loss, mask_iou_loss (`torch.FloatTensor`, *optional*):
        Its unweighted terms (means over the objects), for logging.
    """

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    diffusion_prediction: torch.FloatTensor | None = None
    pred_masks: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    mask_focal_loss: torch.FloatTensor | None = None
    mask_dice_loss: torch.FloatTensor | None = None
    mask_iou_loss: torch.FloatTensor | None = None


class SetokimPrefixCache(DynamicCache):
    r"""
    The LLM's KV cache of the first P columns of a batch of left-padded rows, built once by
    [`SetokimForConditionalGeneration.image_token_prefix_cache`] and read by every
    `image_token_conditions(..., prefix_cache=...)` call on rows that begin with those columns. Those calls run on a
    copy: the cache keeps holding the P prefix columns only.

    A `DynamicCache` (per LLM layer, keys and values `(B, num_key_value_heads, P, head_dim)`; a sliding-window layer
    keeps its last `sliding_window - 1` columns) that also records the columns it was built from, so that it cannot be
    used with rows it does not belong to.

    prefix_input_ids (`torch.LongTensor` of shape `(B, P)`): the cached columns of `input_ids`.
    prefix_attention_mask (`torch.Tensor` of shape `(B, P)`): the cached columns of `attention_mask`.
    """

    def __init__(self, config=None, prefix_input_ids=None, prefix_attention_mask=None):
        super().__init__(config=config)
        self.prefix_input_ids = prefix_input_ids
        self.prefix_attention_mask = prefix_attention_mask

    @property
    def prefix_length(self) -> int:
        """P, the number of cached columns."""
        return 0 if self.prefix_input_ids is None else self.prefix_input_ids.shape[1]


class SetokimProjector(nn.Module):
    """SeTok token width -> LLM width: Linear, activation, Linear."""

    def __init__(self, config: SetokimConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.token_dim, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(tokens)))


class SetokimPreTrainedModel(PreTrainedModel):
    config: SetokimConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # SeTok stays on one device (its clustering works on whole images); the LLM's own layers are added by transformers.
    _no_split_modules = ["SetokModel"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # Decode steps compile with `fullgraph=True` on a static cache (tests/test_setokim_guarantees.py); SeTok itself
    # does not: its token count depends on the image (see the README's design notes).
    _can_compile_fullgraph = True

    def _init_weights(self, module):
        super()._init_weights(module)
        # Matched on the layers themselves: a module without parameters of its own is never visited here.
        if isinstance(module, SetokimZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SetokDetokenizer):
            init.normal_(module.query_embeddings, std=self.config.vision_config.initializer_range)
        elif isinstance(module, SetokimPromptStandardization):  # buffers only: a checkpoint from before it had none
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def initialize_weights(self):
        # transformers' own init of the native sub-models (the LLM, SigLIP inside SeTok) first, as a freshly built
        # model gets it; see `loading_setok.initialize_native_submodels`.
        initialize_native_submodels(self)
        super().initialize_weights()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # A checkpoint of another model type is an error, not a randomly initialised Setokim.
        check_model_type(pretrained_model_name_or_path, cls.config_class.model_type, class_name=cls.__name__, **kwargs)
        # Loading swaps every parameter for a new trainable one, which would silently unfreeze SeTok's encoder.
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.base_model.vision_tower.freeze_encoders()
        return loaded


class SetokimModel(SetokimPreTrainedModel):
    """SeTok tower, projector and language model (without the LM head)."""

    def __init__(self, config: SetokimConfig):
        super().__init__(config)
        self.vision_tower = SetokModel._from_config(config.vision_config)
        self.multi_modal_projector = SetokimProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> SetokimImageFeatures:
        """Runs SeTok and the projector.

        Returns a `SetokimImageFeatures` (a `BaseModelOutputWithPooling`) whose `pooler_output` is a list with one
        `(n_i, hidden_size)` tensor per image (n_i: that image's token count), whose `last_hidden_state` holds the
        padded SeTok tokens, with the encoder's patch grid (`patch_features`) when the model has a mask decoder, and
        with the vision encoder's `hidden_states` / `attentions` when `output_hidden_states` / `output_attentions` are
        passed. (The flags travel in `kwargs`, as in transformers' VLMs: `generate` hands named parameters of this
        method to it and takes them away from the LLM.)
        """
        setok = self.vision_tower(
            pixel_values,
            output_patch_features=self.config.use_mask_decoder,
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        projected = self.multi_modal_projector(setok.last_hidden_state)
        per_image = [tokens[:count] for tokens, count in zip(projected, setok.num_tokens.tolist())]
        return SetokimImageFeatures(
            last_hidden_state=setok.last_hidden_state,
            pooler_output=per_image,
            hidden_states=setok.hidden_states,
            attentions=setok.attentions,
            patch_features=setok.patch_features,
            cluster_assignment=setok.cluster_assignment,
        )

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features, masked_image_tokens=None) -> torch.Tensor:
        """Where the image features go (placeholders not in `masked_image_tokens`); raises when placeholders and
        features disagree in number."""
        if input_ids is None:
            placeholder = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == placeholder).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        if masked_image_tokens is not None:
            mask = mask & ~masked_image_tokens
        if int(mask.sum()) != image_features.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {int(mask.sum())}, features: "
                f"{image_features.shape[0]}. Expand each image placeholder to that image's SeTok token count "
                "(SetokimProcessor does this from the counts `get_image_features` returns)."
            )
        return mask[..., None].expand_as(inputs_embeds)

    def _idle_projector_term(self, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
        """While training a batch without images: the projector on an empty input, as a zero to add to the
        embeddings. Its parameters then get a (zero) gradient on every process, so that DDP, DeepSpeed and FSDP run the
        same collectives on a process whose batch has no image as on one whose batch has (`prepare_step` runs SeTok on
        a blank image when another process reads images). Outside training, or with the projector frozen: None."""
        projector = self.multi_modal_projector
        if not (self.training and torch.is_grad_enabled()) or not any(p.requires_grad for p in projector.parameters()):
            return None
        # (never quantized: `QUANTIZATION_SKIP_MODULES`)
        empty = inputs_embeds.new_zeros(0, self.config.vision_config.token_dim, dtype=projector.linear_1.weight.dtype)
        return projector(empty).sum().to(inputs_embeds.dtype)

    def _has_unmasked_placeholders(self, input_ids, masked_image_tokens) -> bool:
        placeholders = input_ids == self.config.image_token_id
        if masked_image_tokens is not None:
            placeholders = placeholders & ~masked_image_tokens
        return bool(placeholders.any())

    def _check_masked_image_tokens(self, masked, input_ids, inputs_embeds, name: str = "masked_image_tokens"):
        """`masked` (the `<image>` positions that keep their embedding) after checking it is a `(B, T)` bool tensor
        that marks `<image>` tokens only; `name` is the argument it came in."""
        if masked is None:
            return None
        shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
        if not isinstance(masked, torch.Tensor) or masked.dtype != torch.bool or tuple(masked.shape) != shape:
            got = (
                f"{masked.dtype} {tuple(masked.shape)}" if isinstance(masked, torch.Tensor) else type(masked).__name__
            )
            raise ValueError(f"`{name}` must be a bool tensor of shape {shape} (batch, sequence), got {got}.")
        if input_ids is not None and bool((masked & (input_ids != self.config.image_token_id)).any()):
            raise ValueError(f"`{name}` may only mark `<image>` positions (`config.image_token_id`).")
        return masked

    def _check_context_length(self, new_length: int, past: int):
        # Nothing is truncated: a sequence past the LLM's positions is an error, not silently cut or extrapolated.
        limit = context_limit(self.config.text_config)
        if limit is not None and past + new_length > limit:
            raise ValueError(
                f"The sequence ({past + new_length} tokens, image tokens included) is longer than the language "
                f"model's context ({limit} positions: `text_config.max_position_embeddings` and its RoPE scaling)."
            )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        masked_image_tokens: torch.BoolTensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> SetokimModelOutputWithPast:
        r"""
        cache (`Cache`, *optional*): the KV cache (`past_key_values`, its name before transformers 5.24, works too).
        masked_image_tokens (`(B, T)` bool, *optional*): `<image>` positions that receive no image feature and keep
            the `<image>` embedding: the hidden targets of images being generated and (from
            `SetokimForConditionalGeneration.forward`) the prompts of referred objects. The image features fill the
            other placeholders only.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if pixel_values is not None and mm_encoder_outputs is not None and "image" in mm_encoder_outputs:
            raise ValueError("Pass either `pixel_values` or `mm_encoder_outputs['image']`, not both.")
        cache = resolve_cache(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # The checks below read counts on the host; a compiled decode step (static cache, `fullgraph=True`) skips
        # them: the eager prefill has made them, and a decode step reads no image.
        checking = not torch.compiler.is_compiling()
        past = cache.get_seq_length() if cache is not None and checking else 0
        if checking:
            self._check_context_length(inputs_embeds.shape[1], past)

        masked_image_tokens = self._check_masked_image_tokens(masked_image_tokens, input_ids, inputs_embeds)
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values)
        image_features = None
        if image_outputs is not None:
            image_features = torch.cat(list(image_outputs.pooler_output)).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features, masked_image_tokens)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)
        elif (
            checking
            and input_ids is not None
            and past == 0
            and self._has_unmasked_placeholders(input_ids, masked_image_tokens)
        ):
            raise ValueError(
                "Image features and image tokens do not match: the text holds image tokens but no image was given."
            )
        else:
            idle = self._idle_projector_term(inputs_embeds)
            if idle is not None:
                inputs_embeds = inputs_embeds + idle

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **cache_kwargs(self.language_model, cache),
            **kwargs,
        )
        return SetokimModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            image_outputs=image_outputs,
            **{CACHE_OUTPUT_FIELD: cache_of(outputs)},
        )


class SetokimForConditionalGeneration(SetokimPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As the causal LMs it wraps: under tensor parallelism the head is column-sharded and its output gathered (a tied
    # backbone's head then reads the embedding's matching shards).
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: SetokimConfig):
        super().__init__(config)
        self.model = SetokimModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.generation_head = None
        self.image_decoder = None
        if config.use_generation_head:
            self.generation_head = SetokimDiffusionHead(
                token_dim=config.vision_config.token_dim,
                condition_dim=config.text_config.hidden_size,
                width=config.generation_head_width,
                depth=config.generation_head_depth,
            )
            self.image_decoder = SetokDetokenizer(config.vision_config)
        self.mask_decoder = SetokimMaskDecoder(config) if config.use_mask_decoder else None
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def require_generation_head(self):
        """Raises unless the model has a generation head (`config.use_generation_head`)."""
        if self.generation_head is None:
            raise ValueError(
                "This Setokim has no generation head: build it with `use_generation_head=True` "
                "(`transformers_setok.add_generation_head` adds one to a trained model)."
            )

    def require_mask_decoder(self):
        """Raises unless the model has a mask decoder (`config.use_mask_decoder`)."""
        if self.mask_decoder is None:
            raise ValueError("This Setokim has no mask decoder: build it with `SetokimConfig(use_mask_decoder=True)`.")

    def predict_masks(
        self,
        prompt_hidden_states: torch.Tensor,
        prompt_lengths: torch.Tensor,
        image_outputs: BaseModelOutputWithPooling,
        image_index: torch.Tensor,
    ) -> SetokimMaskPrediction:
        """Masks of S referred objects from the LLM's hidden states at their prompt slots.

        `prompt_hidden_states` `(M, hidden_size)`: the last hidden states (`SetokimModel`'s `last_hidden_state`) at
        the `<image>` slots of the S objects, concatenated in object order, e.g.
        `last_hidden_state[segmentation_prompts]`; `prompt_lengths` `(S,)`: each object's slot count m_i >= 1, summing
        to M (`segmentation_prompt_lengths(segmentation_prompts)`); `image_outputs`: what `get_image_features`
        returned for the images (its `patch_features` are read); `image_index` `(S,)` long: the image of each object,
        an index into `image_outputs`. Returns `pred_masks` `(S, 4 * grid_size, 4 * grid_size)` logits and
        `iou_scores` `(S,)`.
        """
        self.require_mask_decoder()
        patch_grid = _patch_grid(image_outputs)
        lengths, image_index = _check_mask_objects(
            prompt_hidden_states, prompt_lengths, image_index, patch_grid.shape[0], self.config.text_config.hidden_size
        )
        device = prompt_hidden_states.device
        longest = int(lengths.max()) if lengths.numel() else 0
        real = torch.arange(longest, device=device)[None] < lengths.to(device)[:, None]
        prompts = prompt_hidden_states.new_zeros(lengths.shape[0], longest, prompt_hidden_states.shape[-1])
        prompts[real] = prompt_hidden_states
        masks, iou = self.mask_decoder(prompts, real, patch_grid[image_index.to(patch_grid.device)].to(device))
        return SetokimMaskPrediction(pred_masks=masks, iou_scores=iou)

    def mask_loss_terms(self, pred_masks: torch.Tensor, iou_scores: torch.Tensor, target_masks) -> MaskLossTerms:
        """Per-object mask loss terms `(S,)` of `pred_masks` `(S, h, w)` and `iou_scores` `(S,)` against S
        `target_masks` (each at its own size), weighted by the config's `mask_*` fields (`losses_setok.mask_losses`)."""
        config = self.config
        return mask_losses(
            pred_masks,
            iou_scores,
            target_masks,
            focal_weight=config.mask_focal_weight,
            dice_weight=config.mask_dice_weight,
            iou_weight=config.mask_iou_weight,
            focal_alpha=config.mask_focal_alpha,
            focal_gamma=config.mask_focal_gamma,
        )

    def decode_image_tokens(self, tokens: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """SeTok tokens -> pixels through `image_decoder`: `tokens` `(B, L, token_dim)` (padded), `num_tokens` `(B,)`
        -> `(B, 3, H, W)`, normalised like the image processor's `pixel_values`."""
        self.require_generation_head()
        num_tokens = torch.as_tensor(num_tokens, device=tokens.device)
        if tokens.ndim != 3 or num_tokens.shape != tokens.shape[:1]:
            raise ValueError(
                f"`tokens` must be (B, L, token_dim) and `num_tokens` (B,), got {tuple(tokens.shape)} and "
                f"{tuple(num_tokens.shape)}."
            )
        if bool((num_tokens < 1).any()) or bool((num_tokens > tokens.shape[1]).any()):
            raise ValueError(f"`num_tokens` must lie in [1, {tokens.shape[1]}], got {num_tokens.tolist()}.")
        token_mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < num_tokens[:, None]
        decoder_dtype = self.image_decoder.token_proj.weight.dtype
        return self.image_decoder(tokens.to(decoder_dtype), token_mask)

    def encode_and_expand(
        self,
        batch: dict,
        pixel_values: torch.Tensor | None = None,
        *,
        image_outputs: BaseModelOutputWithPooling | None = None,
        answer_token_counts: list[int] | None = None,
        padding_side: str = "left",
        pad_token_id: int | None = None,
        max_length: int | None = None,
    ) -> tuple[dict, BaseModelOutputWithPooling | None]:
        """The one route from unexpanded placeholders to what the LLM reads: SeTok runs once on `pixel_values`
        (unless `image_outputs`, from `get_image_features`, are given), then each `<image>` of `batch` becomes `[Img]`,
        that image's n_i tokens, `[/Img]` (`placeholders_setokim.expand_image_placeholders`: `labels` follow, input
        image blocks are ignored, target images keep their tokens), re-padded on `padding_side`.

        `batch`: `input_ids` `(B, T)`, optional `attention_mask` and `labels`, and for referring segmentation
        `segmentation_answers` `(B, T)` bool: placeholders that stand for a referred object's answer block rather
        than an image. The s-th of those (row-major) becomes `answer_token_counts[s]` slots, and the expanded batch
        holds `segmentation_prompts` `(B, T')`, True on those slots (what `forward` takes). Returns the expanded batch
        and the image outputs (None without images). Nothing is truncated: a row longer than `max_length` is an error.
        """
        if pixel_values is not None and image_outputs is not None:
            raise ValueError("Pass either `pixel_values` or `image_outputs`, not both.")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values)
        counts = [] if image_outputs is None else [len(features) for features in image_outputs.pooler_output]
        batch = dict(batch)
        answers = batch.pop("segmentation_answers", None)
        is_answer = None
        if answers is not None or answer_token_counts is not None:
            counts, is_answer = self._merge_answer_counts(batch, answers, counts, answer_token_counts)
        if pad_token_id is None:
            pad_token_id = self.generation_config.pad_token_id
        expanded = expand_image_placeholders(
            batch,
            counts,
            **self._placeholder_ids(),
            pad_token_id=0 if pad_token_id is None else int(pad_token_id),  # only ever under a 0 in the mask
            padding_side=padding_side,
            max_length=max_length,
        )
        if is_answer is not None:
            # Slot k (row-major) of the expanded rows belongs to placeholder `owner[k]`: blocks keep their order.
            slots = (expanded["input_ids"] == self.config.image_token_id) & expanded["attention_mask"].bool()
            owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
            prompts = torch.zeros_like(slots)
            prompts[slots] = is_answer[owner].to(slots.device)
            expanded["segmentation_prompts"] = prompts
        return expanded, image_outputs

    def _merge_answer_counts(self, batch, answers, image_counts, answer_counts) -> tuple[list[int], torch.Tensor]:
        """Every placeholder's count in placeholder order (images' and answers' interleaved as they stand), and
        which placeholders are answers, `(P,)` bool."""
        if answers is None or answer_counts is None:
            raise ValueError(
                "Pass `segmentation_answers` in the batch together with `answer_token_counts` (one count per answer "
                "placeholder), or neither."
            )
        input_ids = batch["input_ids"]
        if answers.shape != input_ids.shape or answers.dtype != torch.bool:
            raise ValueError(
                f"`segmentation_answers` must be a bool tensor of `input_ids`' shape {tuple(input_ids.shape)}, got "
                f"{answers.dtype} {tuple(answers.shape)}."
            )
        real = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
        placeholders = (input_ids == self.config.image_token_id) & real
        if bool((answers & ~placeholders).any()):
            raise ValueError("`segmentation_answers` marks tokens that are not image placeholders.")
        is_answer = answers[placeholders].cpu()
        if int(is_answer.sum()) != len(answer_counts) or int((~is_answer).sum()) != len(image_counts):
            raise ValueError(
                f"The batch has {int(is_answer.sum())} answer and {int((~is_answer).sum())} image placeholders, but "
                f"{len(answer_counts)} `answer_token_counts` and {len(image_counts)} images."
            )
        images, answer_iter = iter(image_counts), iter(answer_counts)
        return [int(next(answer_iter) if flag else next(images)) for flag in is_answer.tolist()], is_answer

    @torch.no_grad()
    def prepare_inputs(self, processor, text, images=None, **kwargs):
        """Model inputs for `text` with `images`, SeTok run once, placeholders expanded (`encode_and_expand`), with
        `mm_encoder_outputs`: ready for `forward(**inputs)` (logits, loss) or `generate(**inputs)`."""
        inputs = processor(text=text, images=images, return_tensors="pt", **kwargs).to(self.device)
        pixel_values = inputs.pop("pixel_values", None)
        expanded, image_outputs = self.encode_and_expand(
            dict(inputs),
            pixel_values,
            padding_side=processor.tokenizer.padding_side,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        if image_outputs is not None:
            expanded["mm_encoder_outputs"] = {"image": image_outputs}
        return expanded

    def image_token_conditions(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        masked_image_tokens: torch.BoolTensor,
        visible_image_tokens: list[torch.Tensor],
        prefix_cache: SetokimPrefixCache | None = None,
    ) -> torch.Tensor:
        """The LLM's hidden states at the hidden `<image>` positions of images being drawn: what conditions the
        generation head, `(N, hidden_size)`, N = `masked_image_tokens.sum()`, in row-major order.

        `input_ids`, `attention_mask` `(B, T)` (left padding is fine: positions follow the mask);
        `masked_image_tokens` `(B, T)` marks the hidden slots; `visible_image_tokens` holds, per image in placeholder
        order, the SeTok tokens `(k_i, token_dim)` (before the projector) of its other, already drawn slots.
        `prefix_cache`: what `image_token_prefix_cache` returned for the first P columns of these rows; the LLM then
        reads only the T - P columns after them (projecting only the visible tokens there), and the cache is left
        holding the P columns. Without it, the whole rows are read.
        """
        self.require_generation_head()
        if prefix_cache is not None:
            return self._image_token_conditions_after(
                prefix_cache, input_ids, attention_mask, masked_image_tokens, visible_image_tokens
            )
        dtype = self.model.multi_modal_projector.linear_1.weight.dtype
        projected = [self.model.multi_modal_projector(tokens.to(dtype)) for tokens in visible_image_tokens]
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_left_padded_positions(attention_mask),
            masked_image_tokens=masked_image_tokens,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=projected)},
        )
        return outputs.last_hidden_state[masked_image_tokens]

    @torch.no_grad()
    def image_token_prefix_cache(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        masked_image_tokens: torch.BoolTensor,
        visible_image_tokens: list[torch.Tensor],
        prefix_length: int | None = None,
    ) -> SetokimPrefixCache:
        """The LLM's KV cache of the first `prefix_length` columns of the rows, for `image_token_conditions(...,
        prefix_cache=...)` in every unmasking round. The columns before the first hidden slot (the chat, an edit's
        source image block, `[Img]`) are the same in every round and the LLM is causal: their keys and values are
        computed here once, and the image blocks there are projected once.

        Takes the arguments of `image_token_conditions` (those of its first call, say): `input_ids`, `attention_mask`
        `(B, T)`, left padded; `masked_image_tokens` `(B, T)` bool; `visible_image_tokens`, per image in placeholder
        order, `(k_i, token_dim)` (only those of the placeholders in the prefix are read here). `prefix_length` P: how
        many columns to cache; by default the first column that holds a hidden slot in any row. No hidden slot may lie
        in the prefix, and 1 <= P < T. The rows of every later call must begin with these P columns.

        Returns a `SetokimPrefixCache` (a `DynamicCache`; per layer, keys and values `(B, num_key_value_heads, P,
        head_dim)`). No gradient is kept: it is for sampling.
        """
        self.require_generation_head()
        masked_image_tokens = self._check_hidden_slots(input_ids, attention_mask, masked_image_tokens)
        hidden_columns = masked_image_tokens.any(0).nonzero()
        if not len(hidden_columns):
            raise ValueError("`masked_image_tokens` marks no hidden slot: there is nothing to draw after a prefix.")
        first_hidden = int(hidden_columns[0])
        if prefix_length is None:
            prefix_length = first_hidden
        if not isinstance(prefix_length, int) or isinstance(prefix_length, bool) or not 1 <= prefix_length:
            raise ValueError(f"`prefix_length` must be a positive int, got {prefix_length!r}.")
        if prefix_length > first_hidden:
            raise ValueError(
                f"`prefix_length` ({prefix_length}) reaches past column {first_hidden}, which holds a hidden slot: the "
                "prefix must end before the first hidden slot of every row."
            )
        prefix_tokens, _ = self._split_visible_image_tokens(
            input_ids, masked_image_tokens, visible_image_tokens, prefix_length
        )
        columns = slice(None, prefix_length)
        cache = SetokimPrefixCache(
            config=self.config.text_config,
            prefix_input_ids=input_ids[:, columns].clone(),
            prefix_attention_mask=attention_mask[:, columns].clone(),
        )
        outputs = self.model(
            input_ids=input_ids[:, columns],
            attention_mask=attention_mask[:, columns],
            position_ids=_left_padded_positions(attention_mask)[:, columns],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[self._project(prefix_tokens)])},
            cache=cache,
            use_cache=True,
        )
        if cache_of(outputs) is not cache or cache.get_seq_length() != prefix_length:
            raise ValueError(
                f"The language model ({type(self.model.language_model).__name__}) keeps no KV cache of the prompt: "
                "call `image_token_conditions` without `prefix_cache`."
            )
        return cache

    def _image_token_conditions_after(
        self, prefix_cache, input_ids, attention_mask, masked_image_tokens, visible_image_tokens
    ) -> torch.Tensor:
        """`image_token_conditions` on the columns after `prefix_cache`'s, the cache copied (not extended)."""
        masked_image_tokens = self._check_hidden_slots(input_ids, attention_mask, masked_image_tokens)
        if not isinstance(prefix_cache, SetokimPrefixCache):
            raise ValueError(
                "`prefix_cache` must be what `image_token_prefix_cache` returned for these rows, got "
                f"{type(prefix_cache).__name__}."
            )
        length = prefix_cache.prefix_length
        columns = slice(None, length)
        if (
            prefix_cache.prefix_input_ids.shape[0] != input_ids.shape[0]
            or length >= input_ids.shape[1]
            or not torch.equal(prefix_cache.prefix_input_ids, input_ids[:, columns])
            or not torch.equal(prefix_cache.prefix_attention_mask, attention_mask[:, columns])
        ):
            raise ValueError(
                f"`prefix_cache` holds {tuple(prefix_cache.prefix_input_ids.shape)} (rows, columns) that are not the "
                f"first columns of these `input_ids` / `attention_mask` {tuple(input_ids.shape)} followed by at least "
                "one more: build it with `image_token_prefix_cache` on the same rows."
            )
        if bool(masked_image_tokens[:, columns].any()):
            raise ValueError(
                f"`masked_image_tokens` marks hidden slots in the {length} columns of `prefix_cache`: they would keep "
                "the states cached there. Build the cache on a prefix that ends before every hidden slot."
            )
        _, suffix_tokens = self._split_visible_image_tokens(
            input_ids, masked_image_tokens, visible_image_tokens, length
        )
        after = slice(length, None)
        outputs = self.model(
            input_ids=input_ids[:, after],
            attention_mask=attention_mask,
            position_ids=_left_padded_positions(attention_mask)[:, after],
            masked_image_tokens=masked_image_tokens[:, after],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[self._project(suffix_tokens)])},
            # A copy: the forward appends the new columns to the cache it is given (and a sliding-window layer drops
            # old ones), and every round must start from the prefix alone.
            cache=copy.deepcopy(prefix_cache),
            use_cache=True,
        )
        return outputs.last_hidden_state[masked_image_tokens[:, after]]

    def _check_hidden_slots(self, input_ids, attention_mask, masked_image_tokens) -> torch.BoolTensor:
        """`masked_image_tokens`, checked with `attention_mask` against `input_ids` (the cached routes slice them)."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {got}."
            )
        if masked_image_tokens is None:
            raise ValueError("`masked_image_tokens` is required: the hidden `<image>` slots, a (B, T) bool tensor.")
        return self.model._check_masked_image_tokens(masked_image_tokens, input_ids, None)

    def _split_visible_image_tokens(
        self, input_ids, masked_image_tokens, visible_image_tokens, prefix_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The visible SeTok tokens, concatenated in placeholder order, split at column `prefix_length`: those whose
        `<image>` placeholder lies before it `(C_p, token_dim)` and the others `(C_s, token_dim)`. An image block cut by
        the split gives its first tokens to the prefix."""
        token_dim = self.config.vision_config.token_dim
        for index, image in enumerate(visible_image_tokens):
            if not isinstance(image, torch.Tensor) or image.ndim != 2 or image.shape[-1] != token_dim:
                got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"`visible_image_tokens[{index}]` must be (k, token_dim={token_dim}), got {got}.")
        tokens = (
            torch.cat(list(visible_image_tokens))
            if len(visible_image_tokens)
            else input_ids.new_zeros(0, token_dim, dtype=torch.float)
        )
        placeholders = (input_ids == self.config.image_token_id) & ~masked_image_tokens
        if int(placeholders.sum()) != tokens.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {int(placeholders.sum())}, features: "
                f"{tokens.shape[0]} (the visible `<image>` positions and the rows of `visible_image_tokens`)."
            )
        columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        in_prefix = (columns[placeholders] < prefix_length).to(tokens.device)
        return tokens[in_prefix], tokens[~in_prefix]

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        projector = self.model.multi_modal_projector
        return projector(tokens.to(projector.linear_1.weight.dtype))

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        # `generate` passes the image features only on a first iteration; an assistant model's generate calls never
        # are one, though its first call still has an empty cache and must read the images.
        cache = resolve_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        features = kwargs.get("mm_encoder_outputs")
        if features and "mm_encoder_outputs" not in model_inputs and (cache is None or cache.get_seq_length() == 0):
            model_inputs["mm_encoder_outputs"] = features
        return model_inputs

    def _placeholder_ids(self) -> dict[str, int]:
        config = self.config
        return {
            "image_token_id": config.image_token_id,
            "boi_token_id": config.boi_token_id,
            "eoi_token_id": config.eoi_token_id,
        }

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ):
        r"""`GenerationMixin.generate`, with the images encoded once, before the prompt is read.

        The prompt may come in either form (`placeholders_setokim.py`):
        - unexpanded, one `<image>` per image, as `processor(images=..., text=...)` gives it without
          `image_token_counts`: SeTok runs once on `pixel_values`, each placeholder becomes `[Img]`, that image's
          tokens, `[/Img]` (re-padded on the left), and the returned sequences begin with the caller's `input_ids`
          followed by the new tokens, as for any transformers VLM (`scores`, `logits` cover the new tokens only);
        - expanded, `[Img] <image> x n_i [/Img]` per image, with `pixel_values` or `mm_encoder_outputs={"image":
          get_image_features(...)}`: each block must hold its image's SeTok count.
        Mixed forms, placeholders without images, or images without placeholders are errors naming the counts.
        """
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        image_outputs = mm_encoder_outputs.get("image")
        if pixel_values is not None and image_outputs is not None:
            raise ValueError("Pass either `pixel_values` or `mm_encoder_outputs['image']`, not both.")
        if getattr(kwargs.get("generation_config"), "is_assistant", False):
            # Drafting for a main model's assisted decoding: its generate has encoded and expanded already.
            return super().generate(
                input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs=mm_encoder_outputs, **kwargs
            )
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("`pixel_values` need `input_ids` that hold one `<image>` placeholder per image.")
            return super().generate(attention_mask=attention_mask, mm_encoder_outputs=mm_encoder_outputs, **kwargs)

        blocks = image_blocks(input_ids, attention_mask, **self._placeholder_ids())
        if blocks.any_unexpanded and blocks.any_expanded:
            raise ValueError(
                "`input_ids` mix unexpanded `<image>` placeholders with expanded `[Img] ... [/Img]` blocks: give "
                "every image as one `<image>` (with `pixel_values`), or every image expanded to its token count."
            )
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values)
        counts = [] if image_outputs is None else [len(features) for features in image_outputs.pooler_output]

        if not blocks.any_unexpanded:
            declared = [count for row in blocks.expanded_counts for count in row]
            _check_image_counts(declared, counts, expanded=True)
            if image_outputs is not None:
                mm_encoder_outputs["image"] = image_outputs
            return super().generate(
                input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs=mm_encoder_outputs, **kwargs
            )

        _check_image_counts([1] * sum(blocks.num_unexpanded), counts, expanded=False)
        # Left padding: the prompts must end where generation starts.
        expanded, _ = self.encode_and_expand(
            {"input_ids": input_ids, "attention_mask": attention_mask}, image_outputs=image_outputs
        )
        mm_encoder_outputs["image"] = image_outputs
        output = super().generate(
            input_ids=expanded["input_ids"],
            attention_mask=expanded["attention_mask"],
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        return _with_caller_prompt(output, input_ids, prompt_length=expanded["input_ids"].shape[1])

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        masked_image_tokens: torch.BoolTensor | None = None,
        noisy_image_tokens: torch.Tensor | None = None,
        diffusion_timesteps: torch.Tensor | None = None,
        segmentation_prompts: torch.BoolTensor | None = None,
        target_masks: list[torch.Tensor] | torch.Tensor | None = None,
        mask_image_index: torch.LongTensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> SetokimCausalLMOutputWithPast:
        r"""
        labels (`(B, T)`, *optional*): next-token targets (-100 is ignored), shifted inside the loss.
        mm_encoder_outputs (`dict`, *optional*): `{"image": get_image_features(pixel_values)}`, to reuse an
            encoding instead of passing `pixel_values` again.
        masked_image_tokens (`(B, T)` bool, *optional*): hidden `<image>` targets of images being generated (see
            `SetokimModel.forward`); their N hidden states condition the generation head.
        noisy_image_tokens (`(R * N, token_dim)`, *optional*): noised SeTok tokens of the N masked positions, R noise
            draws each, laid out by `repeat_noise_draws`: row `r * N + j` belongs to the j-th masked position
            (row-major order of the mask).
        diffusion_timesteps (`(R * N,)`, *optional*): their diffusion timesteps. With `noisy_image_tokens`, the
            output's `diffusion_prediction` holds the head's output; the trainer forms the loss (it owns the schedule).
        segmentation_prompts (`(B, T)` bool, *optional*): the `<image>` slots of referred objects (inside the answer's
            `[Img] <image> x m [/Img]`; needs `config.use_mask_decoder`). They keep the `<image>` embedding, like
            `masked_image_tokens`; each maximal run of True in a row is one object, objects in row-major order. The
            LLM's hidden states there and the patch grid of each object's image give `pred_masks` and `iou_scores`.
        target_masks (list of S `(H_i, W_i)` tensors, or `(S, H, W)`, *optional*): float or bool masks in [0, 1] of
            the S objects, at any resolution: `mask_loss` is computed at each target's size.
        mask_image_index (`(S,)` long, *optional*): the image of each object, an index into the batch's images in
            placeholder order (into `image_outputs.pooler_output`); required with `segmentation_prompts`.
        """
        prompt_lengths, target_masks = self._check_segmentation_inputs(
            segmentation_prompts,
            target_masks,
            mask_image_index,
            masked_image_tokens,
            input_ids,
            inputs_embeds,
            attention_mask,
            _num_images(pixel_values, mm_encoder_outputs),
        )
        if (noisy_image_tokens is None) != (diffusion_timesteps is None):
            raise ValueError("Pass `noisy_image_tokens` and `diffusion_timesteps` together.")
        if noisy_image_tokens is not None:
            self.require_generation_head()
            if masked_image_tokens is None:
                raise ValueError("`noisy_image_tokens` need `masked_image_tokens`: the positions that condition them.")
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            masked_image_tokens=_union(masked_image_tokens, segmentation_prompts),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        mask_outputs = {}
        prediction = None
        if segmentation_prompts is not None:
            prediction = self.predict_masks(
                hidden_states[segmentation_prompts], prompt_lengths, outputs.image_outputs, mask_image_index
            )
            mask_outputs = {"pred_masks": prediction.pred_masks, "iou_scores": prediction.iou_scores}
            if target_masks is not None:
                mask_outputs.update(self._mask_loss_outputs(prediction, target_masks))
        elif self._mask_decoder_is_training():
            prediction = self._idle_mask_prediction(hidden_states)
        if prediction is not None and prediction.pred_masks.shape[0] == 0 and self._mask_decoder_is_training():
            # No object here, but maybe on another process: the decoder ran on an empty input, and its (zero) output
            # joins the graph so that its parameters get a (zero) gradient (see `_idle_projector_term`).
            idle = prediction.pred_masks.sum() + prediction.iou_scores.sum()
            hidden_states = hidden_states + idle.to(hidden_states.dtype)
        diffusion_prediction = None
        if noisy_image_tokens is not None:
            diffusion_prediction = self.run_generation_head(
                noisy_image_tokens, diffusion_timesteps, hidden_states[masked_image_tokens]
            )
        elif self._head_is_training():
            # No image to draw here, but maybe on another process: the head runs on an empty input, so its parameters
            # get a (zero) gradient and every process runs the same collectives (see `_idle_projector_term`).
            head = self.generation_head
            dtype = head.input_proj.weight.dtype
            idle = head(
                hidden_states.new_zeros(0, self.config.vision_config.token_dim, dtype=dtype),
                hidden_states.new_zeros(0, dtype=dtype),
                hidden_states.new_zeros(0, hidden_states.shape[-1]),
            )
            hidden_states = hidden_states + idle.sum().to(hidden_states.dtype)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            # `num_items_in_batch` (in kwargs, from the Trainer) makes the loss a sum over the whole accumulated batch.
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return SetokimCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_outputs=outputs.image_outputs,
            diffusion_prediction=diffusion_prediction,
            **mask_outputs,
            **{CACHE_OUTPUT_FIELD: cache_of(outputs)},
        )

    def _check_segmentation_inputs(
        self,
        prompts,
        target_masks,
        image_index,
        masked_image_tokens,
        input_ids,
        inputs_embeds,
        attention_mask,
        num_images: int,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        """Checks the segmentation arguments of `forward` before anything runs; returns each object's prompt length
        `(S,)` and the checked target masks (None for what was not given)."""
        given = {
            "segmentation_prompts": prompts is not None,
            "target_masks": target_masks is not None,
            "mask_image_index": image_index is not None,
        }
        if not any(given.values()):
            return None, None
        self.require_mask_decoder()
        if prompts is None:
            names = " and ".join(f"`{name}`" for name, present in given.items() if present)
            raise ValueError(
                f"{names} need `segmentation_prompts`: the `<image>` slots of the referred objects in the answer."
            )
        if image_index is None:
            raise ValueError(
                "`segmentation_prompts` need `mask_image_index`: for each object, the index of its image among the "
                "batch's images."
            )
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        prompts = self.model._check_masked_image_tokens(prompts, input_ids, inputs_embeds, "segmentation_prompts")
        if masked_image_tokens is not None and bool((masked_image_tokens & prompts).any()):
            raise ValueError(
                "`segmentation_prompts` and `masked_image_tokens` overlap: an `<image>` slot is either a referred "
                "object's prompt or a hidden target of an image being drawn."
            )
        if attention_mask is not None and bool((prompts & (attention_mask == 0)).any()):
            raise ValueError("`segmentation_prompts` mark padding positions (where `attention_mask` is 0).")
        lengths = segmentation_prompt_lengths(prompts)
        _check_image_index(image_index, None)
        targets = None if target_masks is None else check_target_masks(target_masks)
        counts = {"objects in `segmentation_prompts`": lengths.shape[0]}
        counts["`mask_image_index` entries"] = image_index.shape[0]
        if targets is not None:
            counts["`target_masks`"] = len(targets)
        if len(set(counts.values())) != 1:
            found = ", ".join(f"{count} {what}" for what, count in counts.items())
            raise ValueError(
                f"Every referred object needs one mask image index (and one target mask): got {found}. Each maximal "
                "run of True in a row of `segmentation_prompts` is one object."
            )
        if not num_images:
            raise ValueError(
                "`segmentation_prompts` need the images they refer to: pass `pixel_values` or "
                "`mm_encoder_outputs={'image': get_image_features(...)}`."
            )
        _check_image_index(image_index, num_images)
        return lengths, targets

    def _mask_loss_outputs(self, prediction: SetokimMaskPrediction, target_masks) -> dict:
        terms = self.mask_loss_terms(prediction.pred_masks, prediction.iou_scores, target_masks)
        names = {"mask_loss": terms.loss, "mask_focal_loss": terms.focal}
        names.update(mask_dice_loss=terms.dice, mask_iou_loss=terms.iou)
        if terms.loss.numel():
            return {name: values.mean() for name, values in names.items()}
        # No object in this batch: zeros that still reach the decoder's outputs.
        zero = (prediction.pred_masks.sum() + prediction.iou_scores.sum()).float() * 0
        return dict.fromkeys(names, zero)

    def _mask_decoder_is_training(self) -> bool:
        decoder = self.mask_decoder
        return (
            decoder is not None
            and self.training
            and torch.is_grad_enabled()
            and any(p.requires_grad for p in decoder.parameters())
        )

    def _idle_mask_prediction(self, hidden_states: torch.Tensor) -> SetokimMaskPrediction:
        """The mask decoder on no object: every layer runs on empty tensors."""
        config = self.config
        patches = hidden_states.new_zeros(
            0, config.vision_config.num_patches, config.vision_config.vision_config.hidden_size
        )
        masks, iou = self.mask_decoder(
            hidden_states.new_zeros(0, 0, hidden_states.shape[-1]),
            hidden_states.new_zeros(0, 0, dtype=torch.bool),
            patches,
        )
        return SetokimMaskPrediction(pred_masks=masks, iou_scores=iou)

    def _head_is_training(self) -> bool:
        head = self.generation_head
        return (
            head is not None
            and self.training
            and torch.is_grad_enabled()
            and any(p.requires_grad for p in head.parameters())
        )

    def run_generation_head(self, noisy_tokens: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor):
        """The generation head on `noisy_tokens` `(R * N, token_dim)` at `timesteps` `(R * N,)`, conditioned on the
        hidden states `condition` `(N, hidden_size)` (each used R times, in order) -> `(R * N, token_dim)`."""
        self.require_generation_head()
        if condition.shape[0] == 0 or noisy_tokens.shape[0] % condition.shape[0]:
            raise ValueError(
                f"`noisy_image_tokens` must hold R rows per masked image token: {noisy_tokens.shape[0]} rows for "
                f"{condition.shape[0]} masked tokens."
            )
        repeats = noisy_tokens.shape[0] // condition.shape[0]
        return self.generation_head(noisy_tokens, timesteps, repeat_noise_draws(condition, repeats))


def _left_padded_positions(attention_mask: torch.Tensor) -> torch.LongTensor:
    """`(B, T)` position ids of left-padded rows: 0 at each row's first real token (padding clamped to 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def segmentation_prompt_lengths(segmentation_prompts: torch.Tensor) -> torch.Tensor:
    """`(B, T)` bool -> `(S,)` long: the length of each maximal run of True in a row (one referred object each), in
    row-major order (a run never continues into the next row)."""
    starts = segmentation_prompts.clone()
    starts[:, 1:] &= ~segmentation_prompts[:, :-1]
    object_ids = starts.flatten().cumsum(0) - 1
    return torch.bincount(object_ids[segmentation_prompts.flatten()], minlength=int(starts.sum()))


def _union(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    if first is None or second is None:
        return second if first is None else first
    return first | second


def _num_images(pixel_values, mm_encoder_outputs) -> int:
    image_outputs = (mm_encoder_outputs or {}).get("image")
    if image_outputs is not None and image_outputs.pooler_output is not None:
        return len(image_outputs.pooler_output)
    return 0 if pixel_values is None else int(pixel_values.shape[0])


def _patch_grid(image_outputs) -> torch.Tensor:
    """The `(num_images, N, C)` encoder patch grid that `get_image_features` of a model with a mask decoder returns."""
    grid = getattr(image_outputs, "patch_features", None)
    if grid is None:
        raise ValueError(
            "The image outputs carry no `patch_features` (the encoder's patch grid the mask decoder reads): pass "
            "`pixel_values`, or what `get_image_features` of this model (with its mask decoder) returned, unchanged."
        )
    if grid.ndim != 3 or grid.shape[0] != len(image_outputs.pooler_output):
        raise ValueError(
            f"`patch_features` must be (num_images={len(image_outputs.pooler_output)}, N, C), got {tuple(grid.shape)}."
        )
    return grid


def _check_image_index(image_index, num_images: int | None, name: str = "mask_image_index"):
    """A 1-D integer tensor (one image per object) whose entries index `num_images` images (unchecked when None)."""
    if (
        not isinstance(image_index, torch.Tensor)
        or image_index.ndim != 1
        or image_index.dtype == torch.bool
        or image_index.is_floating_point()
        or image_index.is_complex()
    ):
        got = (
            f"{image_index.dtype} {tuple(image_index.shape)}" if isinstance(image_index, torch.Tensor) else image_index
        )
        raise ValueError(f"`{name}` must be a 1-D integer tensor (one image index per object), got {got}.")
    if num_images is not None and image_index.numel():
        if int(image_index.min()) < 0 or int(image_index.max()) >= num_images:
            raise ValueError(
                f"`{name}` must index the batch's {num_images} images (0 to {num_images - 1}), got "
                f"{image_index.tolist()}."
            )


def _check_mask_objects(prompt_hidden_states, prompt_lengths, image_index, num_images: int, hidden_size: int):
    """`predict_masks`' arguments checked: returns the lengths and image indices as long tensors."""
    if not isinstance(prompt_hidden_states, torch.Tensor) or prompt_hidden_states.ndim != 2:
        got = (
            tuple(prompt_hidden_states.shape)
            if isinstance(prompt_hidden_states, torch.Tensor)
            else type(prompt_hidden_states).__name__
        )
        raise ValueError(f"`prompt_hidden_states` must be (M, hidden_size={hidden_size}), got {got}.")
    if prompt_hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"`prompt_hidden_states` must have the LLM's width {hidden_size}, got {prompt_hidden_states.shape[-1]}."
        )
    lengths = torch.as_tensor(prompt_lengths)
    if lengths.numel() == 0:
        lengths = lengths.long()
    if lengths.ndim != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool or bool((lengths < 1).any()):
        raise ValueError(f"`prompt_lengths` must be a 1-D tensor of positive integers, got {lengths.tolist()}.")
    if int(lengths.sum()) != prompt_hidden_states.shape[0]:
        raise ValueError(
            f"`prompt_lengths` sum to {int(lengths.sum())} but `prompt_hidden_states` has "
            f"{prompt_hidden_states.shape[0]} rows: give each object's hidden states, concatenated in object order."
        )
    image_index = torch.as_tensor(image_index)
    if image_index.numel() == 0:
        image_index = image_index.long()
    _check_image_index(image_index, num_images, "image_index")
    if image_index.shape != lengths.shape:
        raise ValueError(
            f"`image_index` must hold one image per object ({lengths.shape[0]} objects), got {image_index.shape[0]}."
        )
    return lengths.long(), image_index.long()


def context_limit(text_config) -> int | None:
    """The longest sequence the backbone supports: `max_position_embeddings`, stretched by a RoPE scaling that
    extends it (linear, YaRN, LongRoPE, Llama 3: factor x the original length); None for dynamic NTK scaling, which
    has no fixed limit, or when the config states none. Backbones with one RoPE per layer type (Gemma 3) are limited
    by their most limited one."""
    limit = getattr(text_config, "max_position_embeddings", None)
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    per_layer_type = [value for value in rope.values() if isinstance(value, dict)]
    limits = [_rope_limit(limit, params) for params in (per_layer_type or [rope])]
    if limit is None or None in limits:
        return None
    return min(limits)


def _rope_limit(limit: int | None, rope: dict) -> int | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if limit is None or kind == "dynamic":
        return None
    factor = rope.get("factor")
    if kind != "default" and factor:
        original = rope.get("original_max_position_embeddings") or limit
        return max(limit, int(original * factor))
    return limit


def _check_image_counts(declared: list[int], counts: list[int], *, expanded: bool):
    """`declared`: the prompt's image token count per image (1 per bare placeholder); `counts`: SeTok's."""
    if len(declared) != len(counts):
        form = "`[Img] ... [/Img]` blocks" if expanded else "`<image>` placeholders"
        raise ValueError(
            f"Image features and image tokens do not match: the prompts hold {len(declared)} {form} but "
            f"{len(counts)} images were given. Pass one image per placeholder, in order."
        )
    if expanded:
        for index, (mine, setok) in enumerate(zip(declared, counts)):
            if mine != setok:
                raise ValueError(
                    f"Image features and image tokens do not match: image {index} is expanded to {mine} `<image>` "
                    f"tokens, but SeTok gives it {setok}. Expand with the counts of `get_image_features`, or pass "
                    "one unexpanded `<image>` per image."
                )


def _with_caller_prompt(output, input_ids: torch.Tensor, prompt_length: int):
    """`generate`'s output on the expanded prompts, with the sequences' prompt part replaced by the caller's."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    per_prompt = sequences.shape[0] // input_ids.shape[0]  # num_return_sequences / beams
    prompt = input_ids.to(sequences.device).repeat_interleave(per_prompt, dim=0)
    aligned = torch.cat([prompt, sequences[:, prompt_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return aligned
    output.sequences = aligned
    return output


__all__ = [
    "SetokimForConditionalGeneration",
    "SetokimImageFeatures",
    "SetokimMaskPrediction",
    "SetokimModel",
    "SetokimPreTrainedModel",
    "SetokimPrefixCache",
    "segmentation_prompt_lengths",
]
