"""Which Triton models can carry a queue policy, measured on the bundled server (docs/overload.md).

    flock /tmp/hybridiff-server.lock python -m tools.queue_probe

Writes a throw-away repository of Python models that sleep ``--sleep`` seconds per request (one
instance each): ``batch0`` (max_batch_size 0) and ``batch1`` (max_batch_size 1) with
``max_queue_size: 2``, ``timeout0`` and ``timeout10`` (max_batch_size 0, default timeout ``--sleep / 2``
and ``10 x --sleep``; the latter probed with a client timeout of ``--sleep / 2``), and an
ensemble ``ens`` over ``batch0``. Sends bursts 50 ms apart over HTTP and gRPC and prints, per
request, whether it was served or refused, after how long, and the error.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODEL_PY = '''import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            time.sleep({sleep})
            timeout = pb_utils.Tensor("T", np.array([request.timeout()], dtype=np.int64))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x.copy()), timeout]))
        return responses
'''


def _policy(timeout_us: int) -> str:
    return (f"dynamic_batching {{ default_queue_policy {{ max_queue_size: 2 default_timeout_microseconds: {timeout_us} "
            "timeout_action: REJECT allow_timeout_override: true } }\n")


def write_probe_repository(root: Path, sleep_s: float) -> None:
    models = {
        "batch0": (0, 0), "batch1": (1, 0), "timeout0": (0, int(sleep_s * 5e5)), "timeout10": (0, int(sleep_s * 1e7)),
    }
    for name, (max_batch_size, timeout_us) in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(MODEL_PY.format(sleep=sleep_s))
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
            'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
            'output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }, '
            '{ name: "T" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n" + _policy(timeout_us)
        )
    (root / "ens" / "1").mkdir(parents=True)
    (root / "ens" / "config.pbtxt").write_text(
        'name: "ens"\nplatform: "ensemble"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "batch0" model_version: -1 input_map { key: "X" value: "X" } '
        'output_map { key: "Y" value: "Y" } } ] }\n'
    )


def burst(server, model: str, count: int, protocol: str, timeout_us: int = 0) -> list[str]:
    """``count`` requests 50 ms apart; one line per request, in sending order."""
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    module = http_client if protocol == "http" else grpc_client
    shape = [1, 3] if model == "batch1" else [3]
    lines: list[str] = [""] * count

    def send(i: int) -> None:
        client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
        tensor = module.InferInput("X", shape, "FP32")
        tensor.set_data_from_numpy(np.full(shape, i, np.float32))
        started = time.perf_counter()
        try:
            client.infer(model, [tensor], **({"timeout": timeout_us} if timeout_us else {}))
            lines[i] = f"served after {time.perf_counter() - started:.2f} s"
        except Exception as err:  # the refusal is what we measure
            status = getattr(err, "status", lambda: "?")()
            lines[i] = f"refused after {time.perf_counter() - started:.2f} s: {status} {str(err)[:100]}"
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=120)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each probe model takes per request")
    args = parser.parse_args(argv)
    from tools.triton_process import TritonServer

    with tempfile.TemporaryDirectory(prefix="queue-probe-") as scratch:
        repo = Path(scratch) / "repo"
        write_probe_repository(repo, args.sleep)
        cases = [("batch0", 6, "http", 0), ("batch0", 6, "grpc", 0), ("batch1", 6, "http", 0),
                 ("ens", 6, "http", 0), ("ens", 6, "grpc", 0), ("timeout0", 3, "http", 0),
                 ("batch0", 3, "http", int(args.sleep * 5e5)), ("timeout10", 3, "http", int(args.sleep * 5e5)),
                 ("timeout10", 3, "grpc", int(args.sleep * 5e5))]
        with TritonServer(repo, ready_timeout=120) as server:
            for model, count, protocol, timeout_us in cases:
                client_timeout = f", client timeout {timeout_us} us" if timeout_us else ""
                print(f"{model} over {protocol}, {count} requests{client_timeout}:")
                for i, line in enumerate(burst(server, model, count, protocol, timeout_us)):
                    print(f"  {i}: {line}")


if __name__ == "__main__":
    main()
