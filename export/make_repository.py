"""Write a Triton model repository for N devices, CPU or GPU, for one or more model families.

    python -m export.make_repository --model sdxl=checkpoints/sdxl-small --devices 2 --kind cpu

Per family it writes the public model ``<family>`` (a thin front that hands each request to the next one
and sends it again should that one's process die), ``<family>_orchestrator`` (the BLS model that runs the
request: it calls the others), ``<family>_text_encoder``, ``<family>_denoiser_<i>`` (one per device) and
``<family>_vae``. Every
``model.py`` is a one-line import of the logic in ``hybridiff.triton``; configs come from the
wire definition (``hybridiff.wire``), so the repository is reproducible from this one command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hybridiff import wire
from hybridiff.admission import QueueLimits
from hybridiff.wire import FAMILIES, FamilyWire, Limits, Tensor


@dataclass(frozen=True)
class Deployment:
    """How the models are placed: ``devices`` denoisers, on CPU cores or GPUs."""

    devices: int = 2
    kind: str = "cpu"  # "cpu" or "gpu"
    # Orchestrator instances (a process each): requests in flight per family (the front has queue_size more).
    orchestrator_instances: int = 4
    max_device_batch: int = 8  # samples one denoiser forward may hold when requests meet on a device
    # How long a device waits for more requests before a forward. 0 batches only what queued while
    # it was busy; a delay of about one orchestrator round trip also catches requests stepping in
    # alternation, at that cost per step for a request that is alone.
    batch_delay_us: int = 0
    limits: Limits = Limits()
    queues: QueueLimits = QueueLimits()  # admission: what the public path holds beyond running requests

    @property
    def dtype(self) -> str:
        return "float16" if self.kind == "gpu" else "float32"

    @property
    def wire_type(self) -> str:
        return "TYPE_FP16" if self.kind == "gpu" else "TYPE_FP32"


def _tensor(tensor: Tensor, deployment: Deployment, batched: bool = False) -> str:
    """One config entry. ``batched``: the model has max_batch_size > 0, so the first dimension is implicit."""
    if tensor.dtype == wire.MODEL:
        data_type = deployment.wire_type
    else:
        data_type = "TYPE_STRING" if tensor.dtype == wire.BYTES else f"TYPE_{tensor.dtype}"
    dims = tensor.shape[1:] if batched else tensor.shape
    opt = " optional: true" if tensor.optional else ""
    return f'  {{ name: "{tensor.name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ]{opt} }}'


def _tensors(tensors, deployment: Deployment, batched: bool = False) -> list[str]:
    return [_tensor(t, deployment, batched) for t in tensors]


def _parameters(values: dict[str, str]) -> str:
    items = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())
    return f"parameters [\n{items}\n]\n"


def _instances(deployment: Deployment, device: int, count: int = 1, cpu_only: bool = False) -> str:
    if deployment.kind == "gpu" and not cpu_only:
        return f"instance_group [ {{ count: {count} kind: KIND_GPU gpus: [ {device} ] }} ]\n"
    return f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]\n"


def _config(name: str, inputs: list[str], outputs: list[str], rest: str, max_batch_size: int = 0) -> str:
    return (
        f'name: "{name}"\nbackend: "python"\n'
        + f"max_batch_size: {max_batch_size}\n"
        + "input [\n"
        + ",\n".join(inputs)
        + "\n]\noutput [\n"
        + ",\n".join(outputs)
        + "\n]\n"
        + rest
    )


def _queue_policy(max_queue_size: int, timeout_us: int = 0) -> str:
    """Triton's bounded queue: a request beyond ``max_queue_size`` waiting is refused at once with
    UNAVAILABLE, one still waiting after ``timeout_us`` is refused when it reaches the head. Works on
    these max_batch_size 0 Python models too (measured on the bundled 2.51)."""
    return (
        f"dynamic_batching {{ default_queue_policy {{ max_queue_size: {max_queue_size} "
        f"default_timeout_microseconds: {timeout_us} timeout_action: REJECT allow_timeout_override: true }} }}\n"
    )


def family_models(family: FamilyWire, checkpoint: str, deployment: Deployment) -> dict[str, tuple[str, str]]:
    """Model name -> (config.pbtxt, the hybridiff.triton module its model.py imports)."""
    name = family.name
    limits = deployment.limits
    # Every model holds its inputs to the public limits (hybridiff.validation), so every model gets them.
    common = {"family": name, "checkpoint": checkpoint, "dtype": deployment.dtype, **limits.as_parameters()}
    denoisers = [f"{name}_denoiser_{i}" for i in range(deployment.devices)]
    models: dict[str, tuple[str, str]] = {}
    prompts = _tensors((spec.tensor for spec in wire.PROMPT_INPUTS), deployment)
    queues = deployment.queues
    # Only running public requests call the orchestrator, the encoder and the VAE, one call each at a time:
    # a queue of the public model's instance count never refuses what it admitted. Only the public model
    # has a start deadline (a refusal after denoising would throw the work away).
    held = deployment.orchestrator_instances
    branch_outputs = _tensors(family.branch_outputs(), deployment)

    models[f"{name}_text_encoder"] = (
        _config(
            f"{name}_text_encoder",
            prompts,
            branch_outputs,
            _queue_policy(held) + _instances(deployment, 0) + _parameters(common),
        ),
        "text_encoder",
    )
    for i, model_name in enumerate(denoisers):
        # Batched (implicit first dimension = the request's guidance branches) so that Triton's
        # dynamic batcher queues requests meeting on this device into one execute().
        inputs = _tensors(family.denoiser_inputs(), deployment, batched=True)
        outputs = _tensors(family.denoiser_outputs(), deployment, batched=True)
        params = {
            **common,
            "cpu_cores": str(i),
            "torch_threads": "1",
            "max_device_batch": str(deployment.max_device_batch),
        }
        batching = f"dynamic_batching {{ max_queue_delay_microseconds: {deployment.batch_delay_us} }}\n"
        models[model_name] = (
            _config(
                model_name,
                inputs,
                outputs,
                batching + _instances(deployment, i) + _parameters(params),
                max_batch_size=deployment.max_device_batch,
            ),
            "denoiser",
        )
    models[f"{name}_vae"] = (
        _config(
            f"{name}_vae",
            _tensors([wire.LATENTS], deployment),
            _tensors([wire.IMAGE], deployment),
            _queue_policy(held) + _instances(deployment, deployment.devices - 1) + _parameters(common),
        ),
        "vae",
    )
    orchestrator = f"{name}_orchestrator"
    orchestrator_params = {
        **common,
        "text_encoder": f"{name}_text_encoder",
        "denoisers": ",".join(denoisers),
        "vae": f"{name}_vae",
        "bls_memory": "gpu" if deployment.kind == "gpu" else "cpu",
        "max_per_device": str(queues.max_per_device),
        "start_timeout_us": str(queues.start_timeout_us),
        "admit_by_deadline": "1" if queues.admit_by_deadline else "0",
    }
    request_inputs = [spec.tensor for spec in wire.REQUEST_INPUTS]
    instances = _instances(deployment, 0, deployment.orchestrator_instances, cpu_only=True)
    models[orchestrator] = (
        _config(
            orchestrator,
            _tensors([*request_inputs, wire.REQUEST_KEY], deployment),
            _tensors(wire.RESPONSE_OUTPUTS, deployment),
            _queue_policy(held + queues.queue_size) + instances + _parameters(orchestrator_params),
        ),
        "orchestrator",
    )
    # The public front: it holds the requests running and ``queue_size`` more, pricing each on arrival (admission
    # by deadline) and refusing at once beyond that count; ``queue_size`` spare instances take the arrivals
    # that find it full, so that they are refused at once too instead of waiting in Triton's queue for an
    # instance. Triton's queue on the front (as long as its instances: a burst is enqueued before idle
    # instances take it) carries the public start deadline.
    bounded = queues.queue_size > 0
    front_instances = deployment.orchestrator_instances + (2 * queues.queue_size if bounded else 0)
    front_params = {
        **common,
        "orchestrator": orchestrator,
        "orchestrator_instances": str(deployment.orchestrator_instances),
        "queue_size": str(queues.queue_size),
        "devices": str(deployment.devices),
        "admit_by_deadline": "1" if queues.admit_by_deadline else "0",
    }
    models[name] = (
        _config(
            name,
            _tensors(request_inputs, deployment),
            _tensors(wire.RESPONSE_OUTPUTS, deployment),
            _queue_policy(front_instances if bounded else 0, queues.start_timeout_us)
            + _instances(deployment, 0, front_instances, cpu_only=True)
            + _parameters(front_params),
        ),
        "front",
    )
    return models


MODEL_PY = '''"""Generated by export/make_repository.py; the logic lives in hybridiff.triton.{module}."""

import os
import sys

# The stub's embedded Python ignores PYTHONPATH (sys.flags.ignore_environment), so it would import the
# hybridiff the virtualenv points at, whichever checkout started the server. Honour it here instead.
sys.path[:0] = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]

from hybridiff.triton.{module} import TritonPythonModel  # noqa: E402, F401
'''


def write_repository(out: Path, checkpoints: dict[str, Path], deployment: Deployment) -> Path:
    """Write the repository to ``out``, replacing what was there (atomically, via a temp dir)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".repo-", dir=out.parent))
    for family_name, checkpoint in checkpoints.items():
        family = FAMILIES[family_name]
        # Relative to the repository, so the repository and checkpoints move together.
        relative = os.path.relpath(Path(checkpoint).resolve(), out)
        for model_name, (config, module) in family_models(family, relative, deployment).items():
            model_dir = staging / model_name
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(config)
            (model_dir / "1" / "model.py").write_text(MODEL_PY.format(module=module))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="model_repository", type=Path)
    parser.add_argument(
        "--model", action="append", required=True, metavar="FAMILY=CHECKPOINT",
        help="a family and its diffusers checkpoint folder; repeat to host several families",
    )
    parser.add_argument("--devices", type=int, default=2, help="denoiser devices (one model each)")
    parser.add_argument("--kind", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--orchestrator-instances", type=int, default=Deployment.orchestrator_instances,
                        help="instances of the public front and of the orchestrator: requests in flight per family")
    parser.add_argument("--batch-delay-us", type=int, default=Deployment.batch_delay_us,
                        help="denoiser dynamic batching: max queue delay in microseconds")
    parser.add_argument("--queue-size", type=int, default=QueueLimits.queue_size,
                        help="requests that may wait to start per family; more are refused (0: no bound)")
    parser.add_argument("--start-timeout-us", type=int, default=QueueLimits.start_timeout_us,
                        help="a request waiting longer than this is refused instead of started (0: no limit)")
    parser.add_argument("--max-per-device", type=int, default=QueueLimits.max_per_device,
                        help="orchestrator gate: requests one device may run at once (0: off)")
    parser.add_argument("--admit-by-deadline", action=argparse.BooleanOptionalAction,
                        default=QueueLimits.admit_by_deadline,
                        help="refuse at once a request that cannot finish within its timeout on the current load")
    parser.add_argument("--max-height", type=int, default=Limits.max_height)
    parser.add_argument("--max-width", type=int, default=Limits.max_width)
    parser.add_argument("--max-steps", type=int, default=Limits.max_steps)
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices must be >= 1")
    checkpoints = dict(item.split("=", 1) for item in args.model)
    queues = QueueLimits(args.queue_size, args.start_timeout_us, args.max_per_device, args.admit_by_deadline)
    try:
        queues.validate()
    except ValueError as err:
        parser.error(str(err))
    deployment = Deployment(
        devices=args.devices,
        kind=args.kind,
        orchestrator_instances=args.orchestrator_instances,
        batch_delay_us=args.batch_delay_us,
        queues=queues,
        limits=Limits(max_height=args.max_height, max_width=args.max_width, max_steps=args.max_steps),
    )
    out = write_repository(args.out, {k: Path(v) for k, v in checkpoints.items()}, deployment)
    print(f"wrote {out} for {', '.join(checkpoints)} on {args.devices} {args.kind} device(s)")


if __name__ == "__main__":
    main()
