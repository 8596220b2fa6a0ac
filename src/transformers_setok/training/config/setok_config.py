"""`model.setok_config`: the keys and values of a new SeTok, checked against the config classes themselves before the
(small) SetokConfig is built, each error naming the dotted key.

* SetokConfig's own keys, and each value against its field's annotation (`cluster_threshold: '0.4'` is refused here,
  not in the first training step).
* The nested encoder configs (`vision_config`, `text_config`) against the transformers config class of their
  `model_type` (the SetokConfig default when absent): a key that class would keep as a made-up attribute
  (`hiden_size`) is refused with the close matches, the generic keys every transformers config takes are not.
* The shape of a new vision encoder: a width its heads divide, an image its patches tile.
"""

import dataclasses
import inspect

from huggingface_hub.errors import StrictDataclassError

from .bounds import check_count
from .typed_yaml import ConfigError, check_type, did_you_mean, dotted, field_types

__all__ = ["check_setok_config", "check_sub_config", "check_vision_encoder_shape"]

# What transformers' config constructors raise for a bad value: their own checks, and huggingface_hub's strict
# dataclass validation of the field types.
CONSTRUCTOR_ERRORS = (TypeError, ValueError, KeyError, StrictDataclassError)


def check_setok_config(setok_config: dict, where: str = "model.setok_config"):
    """Every key and value of a SetokConfig mapping; a ConfigError naming the first bad one."""
    from ...modeling import SetokConfig

    types = field_types(SetokConfig)
    unknown = [key for key in setok_config if key not in types]
    if unknown:
        own = _own_fields(SetokConfig)  # the generic PreTrainedConfig keys would drown them
        raise ConfigError(
            f"Unknown key `{dotted(where, unknown[0])}`.{did_you_mean(unknown[0], own)} The keys of `{where}` are "
            f"SetokConfig's: {', '.join(own)}."
        )
    for key, value in setok_config.items():
        check_type(value, types[key], dotted(where, key))
    for key, spec in SetokConfig.sub_configs_defaults.items():
        if isinstance(setok_config.get(key), dict):
            sub_config = check_sub_config(setok_config[key], spec, dotted(where, key))
            if key == "vision_config":
                check_vision_encoder_shape(sub_config, dotted(where, key))
    try:
        SetokConfig(**setok_config)
    except CONSTRUCTOR_ERRORS as error:
        raise ConfigError(f"`{where}`: {error}") from error


def check_sub_config(mapping: dict, spec, where: str):
    """The nested config `mapping` of a SubConfigSpec `spec` (a field of `sub_configs_defaults`), checked against
    its config class; returns the config object built from it."""
    cls = _config_class(mapping, spec, where)
    types = field_types(cls)
    for key, value in mapping.items():
        if key in types:
            check_type(value, types[key], dotted(where, key))
    kwargs = {key: value for key, value in mapping.items() if key != "model_type"}
    try:
        built = cls(**kwargs)
    except CONSTRUCTOR_ERRORS as error:
        raise ConfigError(f"`{where}` ({cls.__name__}): {error}") from error
    # A key that is no parameter of the class and that the base class did not consume (as it does `torch_dtype`,
    # `num_labels` or `attn_implementation`) ends up as a made-up attribute, saved to config.json and read by nothing.
    parameters = set(types) | set(inspect.signature(cls.__init__).parameters)
    unknown = [key for key in kwargs if key not in parameters and key in vars(built)]
    if unknown:
        own = _own_fields(cls)
        raise ConfigError(
            f"Unknown key `{dotted(where, unknown[0])}`: not a field of {cls.__name__} (`{where}.model_type` "
            f"{_model_type(mapping, spec)!r}).{did_you_mean(unknown[0], own)} Its fields: {', '.join(own)}."
        )
    return built


def check_vision_encoder_shape(config, where: str):
    """A new patch-grid encoder's width must split evenly into its heads (SigLIP, CLIP and ViT would fail to build),
    and its image must be tiled by whole patches (a remainder would be cut off and never seen nor reconstructed)."""
    for key in ("hidden_size", "num_attention_heads", "image_size", "patch_size"):
        for side in _sides(getattr(config, key, None)):
            check_count(side, f"{where}.{key}")
    width, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise ConfigError(
            f"`{where}.hidden_size` ({width}) must be divisible by `{where}.num_attention_heads` ({heads}), so that "
            f"each head gets an equal share: use a width of {_multiples_around(width, heads)}."
        )
    image_sides, patch_sides = _sides(getattr(config, "image_size", None)), _sides(getattr(config, "patch_size", None))
    for image, patch in zip(image_sides, patch_sides):
        if image % patch:
            raise ConfigError(
                f"`{where}.image_size` ({image}) is not a multiple of `{where}.patch_size` ({patch}): the last "
                f"{image % patch} pixels of each side would be cut off, never seen nor reconstructed. Use an image "
                f"size of {_multiples_around(image, patch)}."
            )


def _multiples_around(value: int, step: int) -> str:
    """The multiples of `step` next to `value`: "24 or 32"."""
    below = value - value % step
    return " or ".join(str(size) for size in ([below] if below else []) + [below + step])


def _sides(value) -> list[int]:
    """An int size or an (height, width) pair as a list of ints; anything else (unset, strings) as no sides."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(
        isinstance(side, int) and not isinstance(side, bool) for side in value
    ):
        return list(value)
    return []


def _model_type(mapping: dict, spec) -> str:
    return mapping.get("model_type", spec.model_type)


def _config_class(mapping: dict, spec, where: str):
    """The transformers config class of a nested config: its spec's own class, or the class of its `model_type`."""
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(spec.config_class, type) and issubclass(spec.config_class, PreTrainedConfig):
        return spec.config_class
    model_type = _model_type(mapping, spec)
    check_type(model_type, str, f"{where}.model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"`{where}.model_type`: {model_type!r} is no transformers model type."
            f"{did_you_mean(model_type, list(CONFIG_MAPPING.keys()))}"
        )
    return CONFIG_MAPPING[model_type]


def _own_fields(cls) -> list[str]:
    """The fields of a transformers config class without the generic ones every config has."""
    from transformers import PreTrainedConfig

    common = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return [name for name in field_types(cls) if name not in common]
