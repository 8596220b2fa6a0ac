"""What a conversion returns and says: `ConversionResult` and its report, `ConversionError`, and the reasons given
for upstream keys without a counterpart and for our keys that keep their initialisation."""

import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..modeling import SetokConfig, SetokimConfig

UNRECOGNISED = "UNRECOGNISED: no conversion rule covers this key"
DETOKENIZER_REASON = (
    "upstream detokenizer (BERT Q-Former mapper + timm ViT pixel decoder, no output head) is a different "
    "architecture from ours"
)
GENERATION_HEAD_REASON = (
    "upstream's diffusion head swapped width and depth (3 wide, 1024 blocks deep; spec 7), a different network from "
    "ours (1024 wide, 3 deep): train `generation_head` in stage 2"
)
OUR_DETOKENIZER_REASON = "no upstream counterpart (upstream's detokenizer differs and had no output head): train it"
DISCRIMINATOR_REASON = (
    "upstream NLayerDiscriminator normalises with BatchNorm2d, ours with GroupNorm(1): its convolutions were trained "
    "against batch statistics and do not carry over; retrain it (training-only module)"
)


class ConversionError(ValueError):
    """The checkpoint and the target config disagree (the message names the upstream key)."""


@dataclass
class ConversionResult:
    """Our state dict plus an account of every upstream key and every one of our keys.

    `mapped`: upstream key -> our keys it filled. `synthesised`: our key -> how the converter built its value.
    `unmapped`: upstream key -> why it has no counterpart. `missing`: our key -> why it keeps its initialisation.
    `warnings`: where the converted network is not exactly upstream's.
    """

    model_class: type
    config: SetokConfig | SetokimConfig
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    mapped: dict[str, list[str]] = field(default_factory=dict)
    synthesised: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def unrecognised(self) -> list[str]:
        return [key for key, reason in self.unmapped.items() if reason == UNRECOGNISED]

    def report(self) -> str:
        filled = {key for ours in self.mapped.values() for key in ours}
        total = len(self.state_dict) + len(self.missing)
        lines = [
            f"Mapped {len(self.mapped)} upstream tensors onto {len(filled)} of the {total} tensors of "
            f"{self.model_class.__name__}; the converter built {len(self.synthesised)}, {len(self.missing)} keep their "
            "initialisation."
        ]
        known = {key: reason for key, reason in self.unmapped.items() if reason != UNRECOGNISED}
        sections = [
            ("Built by the converter", self.synthesised),
            ("Upstream keys without a counterpart", known),
            ("Our keys that keep their initialisation", self.missing),
            ("UNRECOGNISED upstream keys, refused by --strict", dict.fromkeys(self.unrecognised, "")),
        ]
        for title, entries in sections:
            if entries:
                lines += ["", f"{title} ({len(entries)}):", *_summarise(entries)]
        if self.warnings:
            lines += ["", "WARNINGS: where the converted network is not exactly upstream's:"]
            lines += [f"  - {warning}" for warning in self.warnings]
        return "\n".join(lines)


def _summarise(entries: dict[str, str]) -> list[str]:
    """One line per (reason, top-level module): the keys' common prefix and their count."""
    groups = defaultdict(list)
    for key, reason in entries.items():
        groups[reason, key.split(".")[0]].append(key)
    lines = []
    for (reason, _), keys in groups.items():
        label = keys[0] if len(keys) == 1 else ".".join(os.path.commonprefix([k.split(".") for k in keys])) + ".*"
        lines.append(f"  {label:<64} {len(keys):>5}  {reason}".rstrip())
    return lines
