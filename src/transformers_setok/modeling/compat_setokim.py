"""Where the supported transformers releases differ, in one place (this file ships as Hub remote code, so it must
work on every release the package allows, not just on one pin).

- The KV cache: transformers 5.23 names it `past_key_values` (in forwards and in output dataclasses); 5.24 names it
  `cache` and keeps `past_key_values` as a deprecated alias. `generate` passes whichever name its release uses.
"""

import inspect

from transformers.modeling_outputs import BaseModelOutputWithPast

# The field under which this release's output dataclasses hold the cache.
CACHE_OUTPUT_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache, past_key_values):
    """The cache a forward was given, under either name."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def cache_kwargs(module, cache) -> dict:
    """`{name: cache}` with the name `module.forward` takes its cache under (a backbone of this release)."""
    name = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    return {name: cache}


def cache_of(outputs):
    """The cache held by a transformers output dataclass of this release."""
    return getattr(outputs, CACHE_OUTPUT_FIELD, None)


__all__ = ["CACHE_OUTPUT_FIELD", "cache_kwargs", "cache_of", "resolve_cache"]
