"""What the trainers check about the distributed engine accelerate set up for them."""

import os

__all__ = ["refuse_engines_turned_off"]


def refuse_engines_turned_off(trainer) -> None:
    """Refuses a run whose accelerate config asks for FSDP or DeepSpeed that accelerate has quietly turned off
    (it would train as plain DDP, or as separate copies, without saying so). Every trainer of the package calls it at
    the end of its `__init__`."""
    requested = {
        "FSDP": (
            "ACCELERATE_USE_FSDP",
            trainer.is_fsdp_enabled,
            "accelerate builds FSDP from GPU states only, so on the CPU it falls back to DDP or to separate "
            "single-process copies. Train with FSDP on GPUs; on the CPU use configs/accelerate/ddp.yaml or a "
            "DeepSpeed config",
        ),
        "DeepSpeed": (
            "ACCELERATE_USE_DEEPSPEED",
            trainer.is_deepspeed_enabled,
            "with `use_cpu: true` (ACCELERATE_USE_CPU) accelerate runs plain DDP instead. On a machine without "
            "GPUs keep `use_cpu: false`: DeepSpeed then runs on its CPU accelerator (gloo) by itself",
        ),
    }
    for engine, (variable, enabled, why) in requested.items():
        if os.environ.get(variable, "false").lower() == "true" and not enabled:
            raise RuntimeError(
                f"The accelerate config asks for {engine} ({variable}=true), but it is not enabled in this run: {why}."
            )
