"""Stage 3: instruction tuning Setokim with TRL's `SFTTrainer`, fully or with (Q)LoRA (spec 3).

    records {"images", "messages"} -> SetokimChatCollator (one `<image>` per image, labels on the answers only)
            -> SetokimInputsMixin.compute_loss: SeTok runs once, each `<image>` becomes `[Img]` n_i x `<image>` `[/Img]`
            -> SFTTrainer.compute_loss (fused LM head, TRL's metrics), or, for a model with a mask decoder or a
               generation head, the model's own forward (which runs them) in every step, on every process

What trains: the LLM (whole, or LoRA on its attention and MLP projections) and the projector; never SeTok, which
stage 1 trained, nor its detokenizer (`image_decoder`). With `train_generation_head=True` also the generation head, on
the chats that draw an image (an edit's target, a text-to-image answer): whole under LoRA too, as a
`modules_to_save` copy that the adapter saves and `merge_adapters` folds back in. A referring-segmentation record
trains the mask decoder (see `setokim_lora_config`). The paper's recipe is LoRA r=128, alpha=256, dropout 0.05 with
the projector trained whole (`setokim_lora_config`); QLoRA adds a 4-bit LLM that leaves SeTok, the projector and the
LM head in full precision (`setokim_4bit_config`). `merge_adapters` / `merge_adapters_from` turn an adapter into a
plain Setokim checkpoint.

Why TRL's own data path is switched off: it would tokenize (and maybe truncate or pack) each sample before SeTok has
decided how many tokens each image takes. Here nothing is prepared ahead of time, nothing is truncated, and the
collator builds the labels itself (prompt, image blocks and padding masked).
"""

import logging
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from ..modeling import SetokimForConditionalGeneration
from ..processing import SetokimProcessor
from .collators import SetokimChatCollator
from .setokim_trainer import SetokimInputsMixin, loss_weight

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATION_HEAD",
    "LLM_LORA_TARGETS",
    "QUANTIZATION_SKIP_MODULES",
    "SetokimSFTTrainer",
    "merge_adapters",
    "merge_adapters_from",
    "setokim_4bit_config",
    "setokim_lora_config",
    "setokim_sft_config",
]

# PEFT full-matches a string target against each module name: only the LLM's projections, never SeTok's attention
# (which has its own q/k/v projections) nor the projector (upstream's list caught the tokenizer's layers, spec 3).
LLM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

# Quantizer skip patterns match module names from the start, and a given list replaces transformers' default one
# (which holds `lm_head`), so every module that must stay in full precision is named here by its full path.
QUANTIZATION_SKIP_MODULES = [
    "model.vision_tower",
    "model.multi_modal_projector",
    "lm_head",
    "mask_decoder",
    "generation_head",
    "image_decoder",
]
# The generation head's module name, as `modules_to_save` names it (a LoRA run that trains the head saves it whole).
GENERATION_HEAD = "generation_head"


# --------------------------------------------------------------------------------------------------------------------
# Presets


def setokim_lora_config(r: int = 128, lora_alpha: int = 256, lora_dropout: float = 0.05, **overrides) -> LoraConfig:
    """The paper's stage-3 LoRA: the LLM's attention and MLP projections get adapters, the projector and (for a model
    that has one) the mask decoder are trained whole (`modules_to_save`), SeTok gets nothing. `overrides` go to
    `LoraConfig` (e.g. `trainable_token_indices`)."""
    kwargs = dict(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=LLM_LORA_TARGETS,
        modules_to_save=["multi_modal_projector", "mask_decoder"],
        task_type="CAUSAL_LM",
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def setokim_4bit_config(**overrides) -> BitsAndBytesConfig:
    """QLoRA's 4-bit NF4 (double quantization, bf16 compute) for the LLM only: SeTok, the projector and the LM head
    stay unquantized. `overrides` go to `BitsAndBytesConfig` (e.g. `bnb_4bit_compute_dtype=torch.float32` on CPU)."""
    kwargs = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
    )
    kwargs.update(overrides)
    return BitsAndBytesConfig(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# The SFTConfig this design needs

# Settings that TRL's own data path uses and that cannot work once image counts are only known inside the step.
_PACKING = "packed sequences would have to be built before SeTok decides each image's token count"
_MASKED = "SetokimChatCollator already masks everything but the assistant turns"
_MUST_BE_OFF = {
    "packing": _PACKING,
    "eval_packing": _PACKING,
    "padding_free": "the collator pads each batch and the image expansion re-pads it",
    "assistant_only_loss": _MASKED,
    "completion_only_loss": _MASKED,
}


def setokim_sft_config(**kwargs) -> SFTConfig:
    """An `SFTConfig` with this trainer's required settings filled in; `kwargs` are any other SFTConfig fields."""
    # Here an explicit `max_length` is known to be the caller's (1024 included), unlike in `settle_sft_config`, which
    # cannot tell TRL's default 1024 from the same value passed on purpose and so reads it as "not set".
    if kwargs.get("max_length") is not None:
        raise _max_length_error(kwargs["max_length"])
    required = dict(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    return SFTConfig(**{**required, **kwargs})


def _max_length_error(max_length: int) -> ValueError:
    return ValueError(
        f"SetokimSFTTrainer needs `SFTConfig(max_length=None)`: TRL would truncate, cutting image placeholders or "
        f"answers. To bound the length, pass `data_collator=SetokimChatCollator(processor, "
        f"max_length={max_length})`, which raises on a longer sample (image tokens included) instead."
    )


def settle_sft_config(args: SFTConfig) -> SFTConfig:
    """Fills in the settings the Setokim data path needs and refuses explicit values that contradict them.

    A value equal to TRL's default is read as "not set" and replaced (`remove_unused_columns=True`,
    `max_length=1024`, `dataset_kwargs=None`); anything else that conflicts is a ValueError naming the setting.
    Changes `args` in place, as `SFTTrainer` itself does.
    """
    for name, reason in _MUST_BE_OFF.items():
        if getattr(args, name):
            raise ValueError(f"SetokimSFTTrainer needs `SFTConfig({name}=False)`: {reason}.")

    # The collator reads `messages` and `images`, which TRL would drop for a text-only data set.
    if args.remove_unused_columns:
        logger.info("Setting `remove_unused_columns=False`: SetokimChatCollator reads the raw records.")
        args.remove_unused_columns = False

    # TRL would tokenize the records ahead of time; the collator works on the raw chat instead.
    dataset_kwargs = dict(args.dataset_kwargs or {})
    if dataset_kwargs.get("skip_prepare_dataset") is False:
        raise ValueError(
            "SetokimSFTTrainer needs `SFTConfig(dataset_kwargs={'skip_prepare_dataset': True})`: SetokimChatCollator "
            "tokenizes the raw chat records itself."
        )
    dataset_kwargs["skip_prepare_dataset"] = True
    args.dataset_kwargs = dataset_kwargs

    # A length limit belongs to the collator, which raises on a long sample instead of cutting images or answers.
    if args.max_length == SFTConfig.__dataclass_fields__["max_length"].default:
        args.max_length = None
    if args.max_length is not None:
        raise _max_length_error(args.max_length)
    return args


# --------------------------------------------------------------------------------------------------------------------
# The trainer


def _setokim_of(model) -> SetokimForConditionalGeneration:
    """The Setokim inside `model` (itself, or the base of a PeftModel); TypeError for anything else."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, SetokimForConditionalGeneration):
        raise TypeError(
            "`model` must be a SetokimForConditionalGeneration (or a PeftModel around one), loaded beforehand, "
            f"got {type(model).__name__}."
        )
    return base


def _is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


class SetokimSFTTrainer(SetokimInputsMixin, SFTTrainer):
    """`SFTTrainer` for stage 3: pass the model, an `SFTConfig`, chat records and the `SetokimProcessor`.

    - `train_dataset`: a `datasets.Dataset` of TRL vision records `{"images": [...], "messages": [...]}` (one
      `{"type": "image"}` part per image); text-only records may be mixed in.
    - `data_collator`: defaults to `SetokimChatCollator(processing_class)`; pass your own for left padding or a
      length limit.
    - `peft_config`: e.g. `setokim_lora_config()`; for QLoRA, load the model with
      `quantization_config=setokim_4bit_config()` first.
    - `args`: see `settle_sft_config` for the settings filled in or refused; `setokim_sft_config` builds one.
    - `mask_loss_weight`: the weight of the mask decoder's loss on referring-segmentation records (a non-negative
      number; see `SetokimInputsMixin`).
    - `train_generation_head`: also train the generation head (the model needs one) on the records that draw an
      image: edits (`training.data.editing_messages`) and text-to-image chats. With a `peft_config` the head is
      added to its `modules_to_save`; False leaves a head the model has frozen (its diffusion loss still trains
      the LLM and projector). `generation_mask_ratio_min`, `diffusion_noise_repeats`, `diffusion_loss_weight` and
      `condition_text_dropout` / `condition_image_dropout` / `condition_both_dropout` mean what they mean in
      stage 2 (`SetokimPretrainTrainer`, `SetokimInputsMixin`).

    SeTok (the whole vision tower) and its detokenizer are frozen before TRL and PEFT see the model.
    """

    def __init__(
        self,
        model,
        args: SFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: SetokimProcessor | None = None,
        *,
        mask_loss_weight: float = SetokimInputsMixin.mask_loss_weight,
        train_generation_head: bool = False,
        generation_mask_ratio_min: float = SetokimInputsMixin.generation_mask_ratio_min,
        diffusion_noise_repeats: int = SetokimInputsMixin.diffusion_noise_repeats,
        diffusion_loss_weight: float = SetokimInputsMixin.diffusion_loss_weight,
        condition_text_dropout: float = 0.0,
        condition_image_dropout: float = 0.0,
        condition_both_dropout: float = 0.0,
        **kwargs,
    ):
        setokim = _setokim_of(model)
        self.mask_loss_weight = loss_weight(mask_loss_weight, "mask_loss_weight")
        self._set_generation_training(
            setokim,
            train_generation_head=train_generation_head,
            generation_mask_ratio_min=generation_mask_ratio_min,
            diffusion_noise_repeats=diffusion_noise_repeats,
            diffusion_loss_weight=diffusion_loss_weight,
            condition_text_dropout=condition_text_dropout,
            condition_image_dropout=condition_image_dropout,
            condition_both_dropout=condition_both_dropout,
        )
        if not isinstance(processing_class, SetokimProcessor):
            raise TypeError(
                "`processing_class` must be the model's SetokimProcessor (its chat template and image processor build "
                f"the batches), got {type(processing_class).__name__}."
            )
        if kwargs.get("formatting_func") is not None:
            raise ValueError("`formatting_func` is not used: records are chat `messages` that the collator renders.")
        if args is None:
            args = setokim_sft_config(output_dir="setokim-sft")
        elif not isinstance(args, SFTConfig):
            raise TypeError(f"`args` must be an SFTConfig (see `setokim_sft_config`), got {type(args).__name__}.")
        args = settle_sft_config(args)
        if data_collator is None:
            data_collator = SetokimChatCollator(processing_class)

        setokim.model.vision_tower.requires_grad_(False)
        if setokim.image_decoder is not None:  # the detokenizer only turns drawn tokens into pixels
            setokim.image_decoder.requires_grad_(False)
        if kwargs.get("peft_config") is not None:
            kwargs["peft_config"] = self._peft_config_for_head(kwargs["peft_config"])
        if isinstance(model, PeftModel):
            self._check_wrapped_head(model)
        elif setokim.generation_head is not None:
            setokim.generation_head.requires_grad_(self.train_generation_head)
        adapted = isinstance(model, PeftModel) or kwargs.get("peft_config") is not None
        if adapted and self.train_generation_head and setokim.config.generation_token_scale is None:
            raise ValueError(
                "`train_generation_head=True` with LoRA needs `model.config.generation_token_scale` (stage 2 sets it "
                "when it trains the head): a scale estimated now would not be saved with the adapter. Set it, or "
                "fine-tune without LoRA (the whole model's config then saves the estimate)."
            )
        self._settle_token_scale(setokim, train_dataset, data_collator)
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._check_requested_engine()
        if _is_quantized(setokim):
            self._keep_projector_in_tower_dtype(setokim)

    def _peft_config_for_head(self, peft_config):
        """`peft_config` with the generation head in its `modules_to_save` when the head trains (a copy; the
        caller's is left as it is), so that the adapter saves the trained head and a merge folds it in. Naming the
        head there without `train_generation_head` is a contradiction: ValueError."""
        saved = list(getattr(peft_config, "modules_to_save", None) or [])
        if not self.train_generation_head:
            if GENERATION_HEAD in saved:
                raise ValueError(
                    f"`peft_config.modules_to_save` ({saved}) trains the generation head, but "
                    "`train_generation_head=False`: pass `train_generation_head=True`, or drop "
                    f"{GENERATION_HEAD!r} from it."
                )
            return peft_config
        if GENERATION_HEAD in saved:
            return peft_config
        if not hasattr(peft_config, "modules_to_save"):
            raise ValueError(
                f"`train_generation_head=True` needs a `peft_config` with `modules_to_save` (the head is trained "
                f"whole and saved with the adapter), got a {type(peft_config).__name__}."
            )
        peft_config = deepcopy(peft_config)
        peft_config.modules_to_save = saved + [GENERATION_HEAD]
        logger.info("Training the generation head whole under LoRA: %r added to `modules_to_save`.", GENERATION_HEAD)
        return peft_config

    def _check_wrapped_head(self, model: PeftModel):
        """A model that is a PeftModel already trains its head only as a `modules_to_save` copy (a head trained
        outside the adapter would not be saved with it)."""
        trained = any(
            param.requires_grad for name, param in model.named_parameters() if f".{GENERATION_HEAD}." in f".{name}"
        )
        if self.train_generation_head and not trained:
            raise ValueError(
                "`train_generation_head=True`, but the PeftModel does not train its generation head: wrap the model "
                f"with {GENERATION_HEAD!r} in `modules_to_save` (or pass `peft_config` and the plain model)."
            )
        if trained and not self.train_generation_head:
            raise ValueError(
                "The PeftModel trains its generation head (`modules_to_save`), but `train_generation_head=False`: "
                "pass `train_generation_head=True`, or wrap it without the head in `modules_to_save`."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with _lm_head_unsharded(self.accelerator.unwrap_model(model)):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    @staticmethod
    def _keep_projector_in_tower_dtype(setokim):
        # For QLoRA, TRL casts every trainable parameter to bf16 (the paper's adapter dtype), the projector's
        # `modules_to_save` copy included. The projector reads SeTok's output, so it must stay in SeTok's dtype:
        # it is left unquantized on purpose, and a bf16 Linear would refuse float32 SeTok tokens outside autocast.
        dtype = next(setokim.model.vision_tower.parameters()).dtype
        for param in setokim.model.multi_modal_projector.parameters():
            param.data = param.data.to(dtype)


@contextmanager
def _lm_head_unsharded(model):
    """The LM head's FSDP 2 unit unsharded while TRL's fused LM head computes the loss (nothing to do without FSDP).

    accelerate gives the LM head a unit of its own (with the input embeddings when they are tied), and FSDP gathers a
    unit's weights in that module's forward. TRL's fused head never calls the module: it reads `lm_head.weight`, a
    shard, and gathers it itself (`DTensor.full_tensor()`), whose backward gives each process the slice of its own
    gradient, unreduced, straight into its shard, so each process moves its slice by its own batch only. Unsharded
    first, the head's weight is the full parameter FSDP manages: its gradient is reduce-scattered (averaged) and the
    unit resharded after the backward like any other. (Tied to the input embeddings, the unit would be unsharded by
    their forward anyway, which is why tied heads were right without this.)"""
    head = model.get_output_embeddings()
    if not _is_fsdp_module(head):
        yield
        return
    head.unshard()
    try:
        yield
    finally:
        if not torch.is_grad_enabled():  # no backward to reshard it (evaluation)
            head.reshard()


def _is_fsdp_module(module) -> bool:
    if not torch.distributed.is_available():  # a torch build without distributed support has no FSDP
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


# --------------------------------------------------------------------------------------------------------------------
# Merging adapters into a plain checkpoint


def merge_adapters(peft_model: PeftModel, out_dir, processor: SetokimProcessor | None = None):
    """Folds the LoRA weights into the base weights and saves a plain Setokim checkpoint (and `processor`) to
    `out_dir`, which `SetokimForConditionalGeneration.from_pretrained` loads without PEFT. Returns the merged model.

    The adapters are merged in place: `peft_model` is consumed (`merge_and_unload`). The trained copies of
    `modules_to_save` (the projector; the mask decoder and generation head when they trained) replace the originals.

    A quantized base (QLoRA) is refused: adding the LoRA delta to 4-bit weights would re-quantize it away. Use
    `merge_adapters_from` with the full-precision base checkpoint and the saved adapter instead.

    Under `accelerate launch` call it on every process; only the main one writes `out_dir`. With DeepSpeed ZeRO-3
    (sharded weights) every process takes part in gathering each weight, the main process merges a full copy on the
    CPU and returns it (`peft_model` is left untouched), the others return None.
    """
    base = _setokim_of(peft_model)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"`peft_model` must be a PeftModel, got {type(peft_model).__name__}.")
    if _is_quantized(base):
        raise ValueError(
            "The base model is quantized: merging LoRA into 4-bit weights would lose most of the adapter. Save the "
            "adapter (`trainer.save_model(dir)`) and call `merge_adapters_from(full_precision_base, dir, out_dir)`."
        )
    is_main = _process_index() == 0
    if any(hasattr(param, "ds_id") for param in peft_model.parameters()):  # ZeRO-3: each process holds a shard
        peft_model = _gathered_copy(peft_model, keep=is_main)
        if peft_model is None:
            return None
    merged = peft_model.merge_and_unload()
    if is_main:
        merged.save_pretrained(out_dir)
        if processor is not None:
            processor.save_pretrained(out_dir)
    return merged


def _process_index() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def _gathered_copy(peft_model: PeftModel, keep: bool) -> PeftModel | None:
    """A full CPU copy of a ZeRO-3 `peft_model`, on the processes with `keep` (None on the others). Every process
    must call it: each weight is gathered from its shards in turn, a collective. (ZeRO-3 shards parameters only: the
    buffers are rebuilt with the copy.)"""
    import deepspeed
    from peft import get_peft_model
    from transformers.integrations import deepspeed as hf_deepspeed

    state = {}
    for name, param in peft_model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if keep:
                state[name] = param.detach().cpu().clone()
    if not keep:
        return None
    base = _setokim_of(peft_model)
    # Built outside ZeRO-3's partitioned construction, which transformers applies while a ZeRO-3 config is registered.
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        fresh = type(base)(base.config)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered
    fresh.generation_config = deepcopy(base.generation_config)
    full = get_peft_model(fresh, peft_model.peft_config[peft_model.active_adapter])
    missing, unexpected = full.load_state_dict(state, strict=False, assign=True)  # assign: the weights' own dtypes
    if missing or unexpected:
        raise RuntimeError(f"The gathered ZeRO-3 weights do not fit a fresh copy: {missing=} {unexpected=}.")
    return full


def merge_adapters_from(
    base_path,
    adapter_path,
    out_dir,
    processor: SetokimProcessor | None = None,
    dtype: torch.dtype = torch.float32,
    prepare_base=None,
):
    """The QLoRA merge: loads the base Setokim from `base_path` unquantized (in `dtype`), applies the adapter saved
    at `adapter_path` (`PeftModel.from_pretrained`), merges and saves as `merge_adapters` does. Returns the merged
    model. The adapter was trained against the 4-bit weights, so the merged model matches the QLoRA one up to the
    quantization error, and the full-precision base plus adapter exactly. `prepare_base(model)`, if given, changes
    the loaded base before the adapter is applied (e.g. adds the mask decoder the run added)."""
    base = SetokimForConditionalGeneration.from_pretrained(base_path, dtype=dtype)
    if prepare_base is not None:
        prepare_base(base)
    peft_model = PeftModel.from_pretrained(base, str(Path(adapter_path)))
    return merge_adapters(peft_model, out_dir, processor)
