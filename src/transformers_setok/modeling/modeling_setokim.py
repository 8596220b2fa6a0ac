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
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from .compat_setokim import CACHE_OUTPUT_FIELD, cache_kwargs, cache_of, resolve_cache
from .configuration_setokim import SetokimConfig
from .diffusion_head_setokim import SetokimDiffusionHead, SetokimZeroInitLinear, repeat_noise_draws
from .loading_setok import check_model_type, initialize_native_submodels
from .modeling_setok import SetokDetokenizer, SetokModel
from .placeholders_setokim import expand_image_placeholders, image_blocks


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
    """

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    diffusion_prediction: torch.FloatTensor | None = None


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
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Runs SeTok and the projector.

        Returns a `BaseModelOutputWithPooling` whose `pooler_output` is a list with one `(n_i, hidden_size)` tensor
        per image (n_i: that image's token count), whose `last_hidden_state` holds the padded SeTok tokens, and with
        the vision encoder's `hidden_states` / `attentions` when `output_hidden_states` / `output_attentions` are
        passed. (The flags travel in `kwargs`, as in transformers' VLMs: `generate` hands named parameters of this
        method to it and takes them away from the LLM.)
        """
        setok = self.vision_tower(
            pixel_values,
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        projected = self.multi_modal_projector(setok.last_hidden_state)
        per_image = [tokens[:count] for tokens, count in zip(projected, setok.num_tokens.tolist())]
        return BaseModelOutputWithPooling(
            last_hidden_state=setok.last_hidden_state,
            pooler_output=per_image,
            hidden_states=setok.hidden_states,
            attentions=setok.attentions,
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

    def _check_masked_image_tokens(self, masked, input_ids, inputs_embeds):
        if masked is None:
            return None
        if masked.dtype != torch.bool or masked.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                f"`masked_image_tokens` must be a bool tensor of shape {tuple(inputs_embeds.shape[:2])} (batch, "
                f"sequence), got {masked.dtype} {tuple(masked.shape)}."
            )
        if input_ids is not None and bool((masked & (input_ids != self.config.image_token_id)).any()):
            raise ValueError("`masked_image_tokens` may only mark `<image>` positions (`config.image_token_id`).")
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
        masked_image_tokens (`(B, T)` bool, *optional*): `<image>` positions of images being generated whose token
            is hidden: they keep the `<image>` embedding, and the image features fill the other placeholders only.
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
        padding_side: str = "left",
        pad_token_id: int | None = None,
        max_length: int | None = None,
    ) -> tuple[dict, BaseModelOutputWithPooling | None]:
        """The one route from unexpanded placeholders to what the LLM reads: SeTok runs once on `pixel_values`
        (unless `image_outputs`, from `get_image_features`, are given), then each `<image>` of `batch` becomes `[Img]`,
        that image's n_i tokens, `[/Img]` (`placeholders_setokim.expand_image_placeholders`: `labels` follow, input
        image blocks are ignored, target images keep their tokens), re-padded on `padding_side`.

        `batch`: `input_ids` `(B, T)`, optional `attention_mask` and `labels`. Returns the expanded batch and the image
        outputs (None without images). Nothing is truncated: a row longer than `max_length` is an error.
        """
        if pixel_values is not None and image_outputs is not None:
            raise ValueError("Pass either `pixel_values` or `image_outputs`, not both.")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values)
        counts = [] if image_outputs is None else [len(features) for features in image_outputs.pooler_output]
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
        return expanded, image_outputs

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
    ) -> torch.Tensor:
        """The LLM's hidden states at the hidden `<image>` positions of images being drawn: what conditions the
        generation head, `(N, hidden_size)`, N = `masked_image_tokens.sum()`, in row-major order.

        `input_ids`, `attention_mask` `(B, T)` (left padding is fine: positions follow the mask);
        `masked_image_tokens` `(B, T)` marks the hidden slots; `visible_image_tokens` holds, per image in placeholder
        order, the SeTok tokens `(k_i, token_dim)` (before the projector) of its other, already drawn slots.
        """
        self.require_generation_head()
        dtype = self.model.multi_modal_projector.linear_1.weight.dtype
        projected = [self.model.multi_modal_projector(tokens.to(dtype)) for tokens in visible_image_tokens]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            masked_image_tokens=masked_image_tokens,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=projected)},
        )
        return outputs.last_hidden_state[masked_image_tokens]

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
        """
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
            masked_image_tokens=masked_image_tokens,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
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
            **{CACHE_OUTPUT_FIELD: cache_of(outputs)},
        )

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


__all__ = ["SetokimForConditionalGeneration", "SetokimModel", "SetokimPreTrainedModel"]
