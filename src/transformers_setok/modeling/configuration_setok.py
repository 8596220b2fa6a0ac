"""Configuration of SeTok, the semantic-equivalent vision tokenizer (Wu et al., ICLR 2025)."""

import copy
import math
import numbers
import warnings
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# SigLIP so400m-patch14-384, the encoder of the paper: a 27 x 27 grid of 1152-wide patch features.
SO400M_VISION_KWARGS = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": False,  # SeTok reads patch features; the pooling head would be computed and thrown away
}


# Training schedule that older releases kept in the config; accepted (with a FutureWarning) but never saved.
GAN_SCHEDULE_FIELDS = ("disc_start", "disc_weight")


class SetokConfig(PreTrainedConfig):
    r"""
    Configuration of [`SetokModel`] and [`SetokForImageReconstruction`].

    Defaults follow the paper's scale: a SigLIP so400m-patch14-384 encoder (729 patches of width 1152), density-peak
    clustering with the upstream threshold, and a merger that emits 4096-wide tokens.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the patch-grid vision encoder (SigLIP vision by default; CLIP vision and ViT work too). SeTok
            clusters the encoder's patch features and never reads a pooled output, so SigLIP's attention-pooling
            head is not built: `vision_use_head` is always `False` here (a given config object is copied, not
            changed). Checkpoints that hold head weights still load; their head keys are reported as unexpected.
        vision_feature_layer (`int`, defaults to -1):
            Index into the encoder's `hidden_states` whose patch features are clustered. -1 is the last layer, before
            any post-layernorm.
        freeze_vision_encoder (`bool`, defaults to `True`):
            Whether the encoder's parameters are frozen when the model is built.
        position_embedding_scale (`float`, defaults to 1.0):
            Multiplier of the fixed 2D sine-cosine position embedding added to the patch features before clustering.
        cluster_method (`"dpc_knn"` or `"iterative"`):
            `"dpc_knn"` is the threshold variant of density-peak clustering (upstream code); `"iterative"` is the
            scope-based seed selection the paper describes. The iterative variant ignores `cluster_threshold` and
            takes at most `max_num_clusters` seeds (`cluster_fallback_num_clusters` when that is unset).
        cluster_k (`int`, defaults to 64): neighbours used for the local density.
        cluster_threshold (`float`, defaults to 0.5): score a patch needs to become a cluster center.
        cluster_fallback_num_clusters (`int`, defaults to 64): centers taken when no score passes the threshold.
        max_num_clusters (`int`, *optional*): hard cap on an image's token count: at most this many centers (the
            best scores), whether they passed the threshold or are the fallback (a larger
            `cluster_fallback_num_clusters` is clipped to it).
        cluster_chunk_size (`int`, *optional*): images clustered at once, to bound the O(B * N^2) memory.
        iterative_bandwidth_scale (`float`, defaults to 0.1):
            Iterative variant: the soft mask bandwidth is this times the image's mean squared patch distance.
        iterative_stop_mass (`float`, defaults to 0.05):
            Iterative variant: stop once the unclaimed scope falls below this fraction of the patches.
        merger_hidden_size, merger_num_attention_heads, merger_intermediate_size (`int`):
            Width, heads and FFN width of the token merger's transformer layers.
        merger_num_intra_layers, merger_num_inter_layers (`int`):
            Layers of the intra-cluster (patches see their own cluster) and inter-cluster (tokens see each other)
            encoders.
        merger_dropout (`float`): dropout inside the merger layers.
        merger_output_norm (`bool`, defaults to `True`): LayerNorm before the projection to `token_dim`. Checkpoints
            converted from the upstream code, whose merger had none, set it to `False`.
        token_dim (`int`, defaults to 4096): width of the emitted SeTok tokens.
        detokenizer_hidden_size, detokenizer_num_attention_heads, detokenizer_intermediate_size (`int`):
            Width, heads and FFN width of the detokenizer.
        detokenizer_num_query_layers (`int`): layers in which the query grid attends to itself and to the tokens.
        detokenizer_num_decoder_layers (`int`): self-attention layers of the pixel decoder.
        detokenizer_token_footprint (`bool`, defaults to `False`):
            Give the detokenizer a footprint head: a linear map from each token to a logit per output patch, whose
            softmax over the image's tokens says which token covers the patch. Every query starts from that mixture
            of the tokens (an unpooling, the merger's cluster mean run backwards) before it attends to them. Without
            it (the paper's detokenizer) a query must learn through cross-attention alone which token holds its
            place, and until it does sees the mean of all tokens: on scenes of several small objects that decodes
            one flat shade for thousands of steps. Stage 1 supervises the footprint with the clustering.
        footprint_loss_weight (`float`, defaults to 1.0):
            Weight of the footprint term: the cross-entropy of each patch's footprint against the cluster it was
            merged into (only with `detokenizer_token_footprint`).
        decoder_patch_size (`int`, *optional*):
            Pixels per side that each query decodes; defaults to the encoder's patch size. The reconstruction has
            `grid * decoder_patch_size` pixels per side and targets are resized to it when they differ.
        reconstruction_loss (`"l1"` or `"mse"`), reconstruction_loss_weight (`float`): the pixel term (alpha).
        perceptual_loss_weight (`float`): weight of the optional perceptual term (needs a user-supplied network).
        use_discriminator (`bool`): build a PatchGAN discriminator for the adversarial term.
        discriminator_num_layers, discriminator_channels (`int`): size of that discriminator.
        disc_start, disc_weight: deprecated and not saved. When the adversarial term starts and its weight are
            training schedule, set on the trainer (`SetokTrainingArguments`); values given here (or read from an
            old config.json) warn, and `SetokTrainer` uses them only when given plain `TrainingArguments`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Frozen text encoder for the concept contrast (any transformers text encoder). `None` disables it.
        concept_loss_weight (`float`): weight of the concept contrast (beta).
        concept_pooling (`"concept"` or `"image"`):
            `"concept"` matches each phrase with its best-matching token of an image (max over tokens);
            `"image"` matches it with the mean of the image's tokens.
        contrastive_temperature_init (`float`): starting temperature of the contrast (learned).
        contrastive_logit_scale_max (`float`): clamp of the learned logit scale.
        contrastive_gather (`bool`, defaults to `True`): in multi-process training, contrast every process's images
            with every process's texts (an all-gather), as if the global batch were on one process.
    """

    model_type = "setok"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip_vision_model", init_kwargs=SO400M_VISION_KWARGS
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -1
    freeze_vision_encoder: bool = True
    position_embedding_scale: float = 1.0

    cluster_method: Literal["dpc_knn", "iterative"] = "dpc_knn"
    cluster_k: int = 64
    cluster_threshold: float = 0.5
    cluster_fallback_num_clusters: int = 64
    max_num_clusters: int | None = None
    cluster_chunk_size: int | None = None
    iterative_bandwidth_scale: float = 0.1
    iterative_stop_mass: float = 0.05

    merger_hidden_size: int = 1152
    merger_num_attention_heads: int = 16
    merger_intermediate_size: int = 4304
    merger_num_intra_layers: int = 2
    merger_num_inter_layers: int = 2
    merger_dropout: float = 0.0
    merger_output_norm: bool = True
    token_dim: int = 4096

    detokenizer_hidden_size: int = 768
    detokenizer_num_attention_heads: int = 12
    detokenizer_intermediate_size: int = 3072
    detokenizer_num_query_layers: int = 6
    detokenizer_num_decoder_layers: int = 6
    detokenizer_token_footprint: bool = False
    footprint_loss_weight: float = 1.0
    decoder_patch_size: int | None = None

    reconstruction_loss: Literal["l1", "mse"] = "l1"
    reconstruction_loss_weight: float = 1.0
    perceptual_loss_weight: float = 0.0
    use_discriminator: bool = False
    discriminator_num_layers: int = 3
    discriminator_channels: int = 64
    disc_start: int | None = None  # deprecated: SetokTrainingArguments.disc_start
    disc_weight: float | None = None  # deprecated: SetokTrainingArguments.disc_weight

    text_config: dict | PreTrainedConfig | None = None
    concept_loss_weight: float = 1.0
    concept_pooling: Literal["concept", "image"] = "concept"
    contrastive_temperature_init: float = 0.07
    contrastive_logit_scale_max: float = 100.0
    contrastive_gather: bool = True

    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._without_pooling_head()
        if self.decoder_patch_size is None:
            self.decoder_patch_size = self.patch_size
        self._validate_setok_fields()
        given = [name for name in GAN_SCHEDULE_FIELDS if getattr(self, name) is not None]
        if given:
            warnings.warn(
                f"SetokConfig's {', '.join(f'`{name}`' for name in given)} (the GAN schedule) are deprecated and not "
                "saved: the schedule is the trainer's, set it in `SetokTrainingArguments`.",
                FutureWarning,
                stacklevel=2,
            )

    def to_dict(self):
        output = super().to_dict()
        for name in GAN_SCHEDULE_FIELDS:
            output.pop(name, None)
        return output

    @property
    def patch_size(self) -> int:
        return _as_square(getattr(self.vision_config, "patch_size", None), "vision_config.patch_size")

    @property
    def image_size(self) -> int:
        return _as_square(getattr(self.vision_config, "image_size", None), "vision_config.image_size")

    @property
    def grid_size(self) -> int:
        """Patches per side of the encoder's grid (27 for so400m-patch14-384: the last 6 pixels are not covered)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def reconstruction_size(self) -> int:
        return self.grid_size * self.decoder_patch_size

    def _without_pooling_head(self):
        # The head's output would be thrown away, its parameters cost memory, and under DeepSpeed ZeRO-3 it cannot
        # run at all: `nn.MultiheadAttention` reads `out_proj.weight` without calling that module, so the partitioned
        # weight is never gathered. Copied first: the caller's config object (or another model's) keeps its head.
        if getattr(self.vision_config, "vision_use_head", False):
            self.vision_config = copy.deepcopy(self.vision_config)
            self.vision_config.vision_use_head = False

    def _validate_setok_fields(self):
        choices = {
            "cluster_method": ("dpc_knn", "iterative"),
            "reconstruction_loss": ("l1", "mse"),
            "concept_pooling": ("concept", "image"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        positive = [
            "cluster_k",
            "cluster_fallback_num_clusters",
            "merger_hidden_size",
            "merger_num_attention_heads",
            "merger_intermediate_size",
            "token_dim",
            "detokenizer_hidden_size",
            "detokenizer_num_attention_heads",
            "detokenizer_intermediate_size",
            "decoder_patch_size",
            "discriminator_num_layers",
            "discriminator_channels",
        ]
        # Clustering fields also take numpy and 0-d tensor numbers, stored as the Python numbers they hold.
        for name in ("cluster_k", "cluster_fallback_num_clusters", "max_num_clusters", "cluster_chunk_size"):
            setattr(self, name, _python_number(getattr(self, name), numbers.Integral))
        for name in ("cluster_threshold", "iterative_bandwidth_scale", "iterative_stop_mass"):
            setattr(self, name, _python_number(getattr(self, name), numbers.Real))
        for name in positive + ["max_num_clusters", "cluster_chunk_size"]:
            value = getattr(self, name)
            if name in positive or value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("iterative_bandwidth_scale", "contrastive_temperature_init", "contrastive_logit_scale_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)!r}.")
        for name in (
            "reconstruction_loss_weight",
            "perceptual_loss_weight",
            "concept_loss_weight",
            "footprint_loss_weight",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not 0 < self.iterative_stop_mass < 1:
            raise ValueError(f"`iterative_stop_mass` must lie in (0, 1), got {self.iterative_stop_mass!r}.")
        for width, heads in (
            ("merger_hidden_size", "merger_num_attention_heads"),
            ("detokenizer_hidden_size", "detokenizer_num_attention_heads"),
        ):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(
                    f"`{width}` ({getattr(self, width)}) must be divisible by `{heads}` ({getattr(self, heads)})."
                )
        num_layers = getattr(self.vision_config, "num_hidden_layers", None)
        if num_layers is not None and not -(num_layers + 1) <= self.vision_feature_layer <= num_layers:
            raise ValueError(
                f"`vision_feature_layer` must index the encoder's {num_layers + 1} hidden states "
                f"(-{num_layers + 1} to {num_layers}), got {self.vision_feature_layer}."
            )
        if self.grid_size < 1:
            raise ValueError(
                f"`vision_config.image_size` ({self.image_size}) must be at least one patch "
                f"(`vision_config.patch_size` = {self.patch_size})."
            )


def _python_number(value, kind):
    """A numpy scalar or 0-d array/tensor holding a number of `kind` as that Python number; anything else as is."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        item = value.item()
        if isinstance(item, kind) and not isinstance(item, bool):
            return int(item) if kind is numbers.Integral else float(item)
    return value


def _as_square(value, name: str) -> int:
    if value is None:  # a text or other non-patch-grid config given as `vision_config`
        raise ValueError(f"`{name}` is missing: `vision_config` must describe a patch-grid vision encoder.")
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"`{name}` must be square, got {value!r}.")
        value = value[0]
    return int(value)


__all__ = ["SetokConfig"]
