"""Tests for tools.triton_process: free ports, and a real round trip through the bundled tritonserver as a
managed child process with a throwaway Python-backend model over HTTP and gRPC; a broken model fails fast."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tools.triton_process import TritonServer, TritonServerError, free_ports, server_unless_given

DOUBLE_CONFIG = """\
name: "double"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

# Imports torch (and reports where from) to prove the stub's embedded Python sees the venv's packages.
DOUBLE_MODEL = """\
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        print(f"double-model torch={torch.__file__}", flush=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT0").to_dlpack())
            out = pb_utils.Tensor.from_dlpack("OUTPUT0", torch.utils.dlpack.to_dlpack((x * 2).contiguous()))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""

BROKEN_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken-model-says-no")
"""


def write_model(repo: Path, name: str, model_py: str, config: str = DOUBLE_CONFIG) -> None:
    """One-version Python-backend model ``repo/name``."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config.replace('"double"', f'"{name}"'))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model_py))


def test_a_named_server_is_used_not_started(tmp_path: Path) -> None:
    with server_unless_given(tmp_path / "no-such-repository", "127.0.0.1:8000") as server:
        assert server is None


def test_free_ports_are_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)


# --- real server -----------------------------------------------------------------------------------


@pytest.fixture
def double_server(tmp_path: Path) -> Iterator[TritonServer]:
    repo = tmp_path / "model_repository"
    write_model(repo, "double", DOUBLE_MODEL)
    server = TritonServer(
        repo, backend_dir=tmp_path / "backends", log_file=tmp_path / "tritonserver.log", ready_timeout=30
    )
    try:
        with server:
            yield server
    finally:
        print(f"--- tritonserver log ({server.log_file}) ---\n{server.logs()}")  # shown only on failure


@pytest.mark.server
def test_python_model_round_trip_http_and_grpc(double_server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.array([0.0, 1.5, -2.0, 3.25], dtype=np.float32)

    # Close the clients: an idle keep-alive HTTP connection would hold up the server's shutdown.
    http = httpclient.InferenceServerClient(double_server.http_url)
    try:
        assert http.is_model_ready("double")
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = http.infer("double", [inp]).as_numpy("OUTPUT0")
    finally:
        http.close()
    np.testing.assert_array_equal(out, x * 2)

    grpc = grpcclient.InferenceServerClient(double_server.grpc_url)
    try:
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = grpc.infer("double", [inp]).as_numpy("OUTPUT0")
    finally:
        grpc.close()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x * 2)

    # The stub imported the venv's torch (not some other Python's).
    torch_line = next(line for line in double_server.logs().splitlines() if "double-model torch=" in line)
    assert Path(torch_line.split("torch=", 1)[1]).is_relative_to(Path(sys.prefix))


@pytest.mark.server
def test_broken_model_fails_fast_with_log(tmp_path: Path) -> None:
    repo = tmp_path / "model_repository"
    write_model(repo, "broken", BROKEN_MODEL)
    server = TritonServer(repo, backend_dir=tmp_path / "backends", log_file=tmp_path / "tritonserver.log")
    with pytest.raises(TritonServerError, match="broken-model-says-no"):
        with server:
            pass
    assert server.process is not None and server.process.returncode != 0
