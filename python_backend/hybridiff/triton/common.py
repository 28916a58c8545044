"""Glue shared by the Triton Python-backend models: config, instance device, tensors, errors.

Imported only inside the Triton stub (``triton_python_backend_utils`` exists nowhere else), except
for the plain helpers at the top, which tests use directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..families.base import torch_dtype
from ..host_memory import keep_freed_memory
from .bls import config_parameters, resolve_checkpoint


@dataclass(frozen=True)
class InstanceDevice:
    """Where a model instance computes: the torch device, its dtype, and (on CPU) its cores."""

    device: torch.device
    dtype: torch.dtype
    cpu_cores: tuple[int, ...] | None

    def apply(self, threads: int) -> None:
        """Pin every thread of this stub process before torch starts its thread pool.

        Affinity is per thread on Linux, and the stub runs ``execute`` on a thread that exists
        before ``initialize``: pinning only the calling thread leaves the compute free to wander onto
        the other device's core.
        Freed activation memory stays mapped (:mod:`hybridiff.host_memory`): the same page faults
        cost both kinds of device, and the orchestrator's host tensors too.
        """
        keep_freed_memory()
        if self.cpu_cores is not None and hasattr(os, "sched_setaffinity"):
            # Core i of the config is the i-th core this process may use (wrapping around), so
            # one repository serves machines with any core count.
            available = sorted(os.sched_getaffinity(0))
            cores = {available[c % len(available)] for c in self.cpu_cores}
            for thread_id in _thread_ids():
                try:
                    os.sched_setaffinity(thread_id, cores)
                except (ProcessLookupError, PermissionError):
                    pass  # a thread that ended meanwhile
        torch.set_num_threads(threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)


def _thread_ids() -> list[int]:
    """Every thread of this process (0, the calling thread, where /proc is not available)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def instance_device_from_args(args: dict, params: dict[str, str]) -> InstanceDevice:
    """KIND_GPU instances use cuda:<device_id> (the stub does not select it for us); CPU instances
    use the cores listed in the ``cpu_cores`` parameter."""
    if args.get("model_instance_kind") == "GPU":
        device = torch.device(f"cuda:{int(args['model_instance_device_id'])}")
        return InstanceDevice(device, torch_dtype(params.get("dtype", "float16")), None)
    cores = params.get("cpu_cores", "")
    cpu_cores = tuple(int(c) for c in cores.split(",") if c.strip()) or None
    return InstanceDevice(torch.device("cpu"), torch_dtype(params.get("dtype", "float32")), cpu_cores)


@dataclass(frozen=True)
class ModelContext:
    """What every model's ``initialize`` derives from Triton's ``args``."""

    name: str
    params: dict[str, str]
    checkpoint: Path
    instance: InstanceDevice


def model_context(args: dict) -> ModelContext:
    config = json.loads(args["model_config"])
    params = config_parameters(config)
    instance = instance_device_from_args(args, params)
    instance.apply(int(params.get("torch_threads", "1")))
    checkpoint = resolve_checkpoint(params["checkpoint"], args["model_repository"])
    return ModelContext(args["model_name"], params, checkpoint, instance)


# --- Triton tensors (only inside the stub) ---------------------------------------------------


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def to_triton(name: str, tensor: torch.Tensor):
    """A torch tensor (CPU or GPU) as a Triton tensor, without a copy where dlpack allows."""
    return _pb().Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor.contiguous()))


def from_triton(tensor) -> torch.Tensor:
    """A Triton tensor as torch (zero-copy; CPU stays CPU, GPU stays on its device)."""
    return torch.from_dlpack(tensor.to_dlpack())


def input_tensor(request, name: str) -> torch.Tensor | None:
    tensor = _pb().get_input_tensor_by_name(request, name)
    return None if tensor is None else from_triton(tensor)


def response(tensors: dict[str, torch.Tensor], extra=()):
    return _pb().InferenceResponse(output_tensors=[to_triton(k, v) for k, v in tensors.items()] + list(extra))
