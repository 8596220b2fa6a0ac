"""Test-only: lets accelerate build its FSDP 2 state on CPU processes (gloo), so that FSDP can be tested here.

Why it exists: accelerate 1.15 switches to FSDP only from GPU-like distributed types; on CPU processes it keeps
MULTI_CPU and the shipped fsdp.yaml trains as plain DDP (which the trainers now refuse). PyTorch's `fully_shard` itself
works on the CPU with gloo, so this shim, imported by tests/engine_training_script.py when SETOK_FSDP_CPU_SHIM=1,
turns a MULTI_CPU state that was given an FSDP plugin into an FSDP one. It never ships in the package.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def install():
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does on GPUs: every later `AcceleratorState()` (the optimizer wrapper makes one) copies
            # the process state's type back, which would otherwise turn the run into MULTI_CPU halfway.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__
