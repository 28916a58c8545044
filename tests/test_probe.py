"""The health probe (hybridiff.probe): its policy without a server, its whole path against a fake
KServe endpoint (failover in the schedule, a dead model), and against the real tritonserver hosting
both tiny families, including a killed denoiser stub and the metric the autoscaler reads."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hybridiff import probe
from hybridiff.params import Limits

# --- policy, no server -----------------------------------------------------------------------------


def test_probe_request_is_the_smallest_cfg_parallel_image() -> None:
    assert probe.PROBE_SIDE == Limits().min_size
    assert probe.PROBE_SIDE % 16 == 0  # SD3's size step (VAE factor x patch size), SDXL's is 8
    fields = {t["name"]: t["data"][0] for t in probe.probe_request()["inputs"]}
    assert fields == {"PROMPT": "probe", "SEED": 0, "STEPS": 1, "HEIGHT": 64, "WIDTH": 64, "MODE": "cfg_parallel"}


def test_schedule_problems() -> None:
    assert probe.schedule_problems("sdxl", {"mode_run": "cfg_parallel"}) == []
    assert probe.schedule_problems("sdxl", {"mode_run": "cfg_parallel", "failover": []}) == []
    (wrong,) = probe.schedule_problems("sdxl", {"mode_run": "serial"})
    assert "sdxl" in wrong and "'serial'" in wrong
    (failed_over,) = probe.schedule_problems("sd3", {"mode_run": "cfg_parallel", "failover": [{"from": 1, "to": 0}]})
    assert failed_over.startswith("sd3:") and '"from": 1' in failed_over
    tries = [{"after_s": 0.4, "tries": 1, "reason": "Stub process 'sd3_orchestrator_0_0' is not healthy."}]
    (resent,) = probe.schedule_problems("sd3", {"mode_run": "cfg_parallel", "resubmitted": tries})
    assert resent.startswith("sd3:") and "sent again" in resent and "sd3_orchestrator_0_0" in resent


# --- the whole probe against a fake KServe endpoint ------------------------------------------------


class FakeServer:
    """Answers the probe's calls for one family ``fam`` with two denoisers; tests change the answers."""

    def __init__(self) -> None:
        self.schedule: dict[str, Any] = {"mode_run": "cfg_parallel", "failover": []}
        self.unready: set[str] = set()
        self.stats_status = 200
        self.requests: list[dict] = []
        self.infer_error: tuple[int, dict] | None = None  # (status, body) the infer call answers instead

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if path in ("/v2/health/live", "/v2/health/ready"):
            return 200, {}
        if path == "/v2/repository/index":
            return 403, {"error": "This API is restricted, expecting header 'admin-key'"}
        if path == "/v2/models/stats" and method == "GET":
            if self.stats_status != 200:
                return self.stats_status, {"error": "statistics unavailable"}
            names = ("fam", "fam_text_encoder", "fam_vae", "other", "other_vae")
            return 200, {"model_stats": [{"name": n, "version": "1"} for n in names]}
        if path.endswith("/ready"):
            model = path.split("/")[3]
            return (400, {"error": f"{model} not ready"}) if model in self.unready else (200, {})
        if path == "/v2/models/fam/config":
            return 200, {"name": "fam", "parameters": {"orchestrator": {"string_value": "fam_orchestrator"}}}
        if path == "/v2/models/fam_orchestrator/config":
            called = {"text_encoder": "fam_text_encoder", "denoisers": "fam_denoiser_0,fam_denoiser_1",
                      "vae": "fam_vae"}
            return 200, {"name": "fam_orchestrator", "parameters": {k: {"string_value": v} for k, v in called.items()}}
        if path.endswith("/config") and path.split("/")[3].startswith("fam_"):
            return 200, {}
        if path == "/v2/models/fam/infer" and method == "POST":
            self.requests.append(json.loads(body))
            if self.infer_error is not None:
                return self.infer_error
            data = [json.dumps(self.schedule)]
            return 200, {"outputs": [{"name": "SCHEDULE", "datatype": "BYTES", "shape": [1], "data": data}]}
        return 404, {"error": f"unknown {method} {path}"}


@pytest.fixture
def fake(monkeypatch) -> Iterator[tuple[FakeServer, str]]:
    monkeypatch.delenv("HYBRIDIFF_MODELS", raising=False)
    state = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = state.answer(method, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._reply("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._reply("POST")

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_probe_passes_and_discovers_the_families(fake, capsys) -> None:
    state, url = fake
    assert probe.main(["--url", url, "--timeout", "5"]) == 0
    assert "probe ok" in capsys.readouterr().out
    (sent,) = state.requests  # one request: "fam" (the only name with a text encoder), not "other"
    assert {t["name"]: t["data"][0] for t in sent["inputs"]}["MODE"] == "cfg_parallel"


def test_probe_takes_the_families_from_the_container_setting(fake, capsys, monkeypatch) -> None:
    """In a pod HYBRIDIFF_MODELS names the families, so the probe needs not even the statistics API."""
    state, url = fake
    state.stats_status = 503
    assert probe.main(["--url", url, "--timeout", "5"]) == 1
    assert "/v2/models/stats: HTTP 503" in capsys.readouterr().err
    monkeypatch.setenv("HYBRIDIFF_MODELS", "fam=/models/fam")
    assert probe.main(["--url", url, "--timeout", "5"]) == 0
    assert len(state.requests) == 1


def test_probe_fails_on_a_failover(fake, capsys) -> None:
    state, url = fake
    state.schedule = {"mode_run": "cfg_parallel", "failover": [{"step": 0, "from_device": 1, "to_device": 0}]}
    assert probe.main(["--url", url, "--timeout", "5"]) == 1
    assert "failed over" in capsys.readouterr().err


@pytest.mark.parametrize("error", ["server full: every device already runs 2 requests; retry later",
                                   "Exceeds maximum queue size"])
def test_a_probe_refused_for_load_passes_as_busy(fake, capsys, error) -> None:
    """A full server is busy, not broken: its liveness probe must not restart it, nor readiness drop it."""
    state, url = fake
    state.infer_error = (503, {"error": error})
    assert probe.main(["--url", url, "--timeout", "5"]) == 0
    out = capsys.readouterr()
    assert "1 refused for load" in out.out
    assert f"probe busy: fam: /v2/models/fam/infer: refused for load: {error}" in out.err
    state.infer_error = (503, {"error": "Stub process 'fam_orchestrator_0_0' is not healthy"})  # 503, not full
    assert probe.main(["--url", url, "--timeout", "5"]) == 1


@pytest.mark.parametrize("model", ["fam_denoiser_1", "fam_vae", "fam_orchestrator", "fam"])
def test_probe_fails_on_any_unready_model(fake, capsys, model) -> None:
    state, url = fake
    state.unready = {model}
    assert probe.main(["--url", url, "--timeout", "5"]) == 1
    assert f"fam: not ready: {model}" in capsys.readouterr().err


def test_probe_fails_clearly_without_a_server(capsys) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe.main(["--url", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "/v2/health/live: no answer from" in capsys.readouterr().err


def test_probe_fails_on_an_unknown_family(fake, capsys) -> None:
    _, url = fake
    assert probe.main(["--url", url, "--timeout", "5", "--family", "nope"]) == 1
    assert "nope: /v2/models/nope/config: HTTP 404" in capsys.readouterr().err


# --- the real server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(sdxl_tiny, sd3_tiny, tmp_path_factory):
    from export.make_repository import Deployment, write_repository
    from tools.triton_process import TritonServer

    repo = tmp_path_factory.mktemp("probe") / "model_repository"
    deployment = Deployment(devices=2, kind="cpu", orchestrator_instances=1,
                            limits=Limits(max_height=128, max_width=128))
    write_repository(repo, {"sdxl": Path(sdxl_tiny), "sd3": Path(sd3_tiny)}, deployment)
    with TritonServer(repo, ready_timeout=300) as running:
        yield running
        print(running.logs()[-3000:])


@pytest.mark.server
def test_probe_passes_on_a_healthy_server(server, capsys) -> None:
    assert probe.main(["--url", server.http_url]) == 0, capsys.readouterr().err
    assert probe.main(["--url", server.http_url, "--family", "sd3"]) == 0, capsys.readouterr().err


@pytest.mark.server
def test_server_exports_the_autoscaling_metric(server) -> None:
    """The HPA's metric (deploy/kubernetes) is Triton's pending-request gauge of the public models."""
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    lines = [line for line in text.splitlines() if line.startswith("nv_inference_pending_request_count{")]
    assert any('model="sdxl"' in line for line in lines), lines
    assert any('model="sd3"' in line for line in lines), lines


def _stub_pids(server, model: str) -> list[int]:
    """Stub processes of ``model`` in the server's process group (their command line names the model)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) != server.process.pid:
                continue
            if f"/{model}/1/model.py".encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.server
def test_probe_fails_when_a_denoiser_stub_is_dead(server, capsys) -> None:
    """Last in the module: it breaks the server. The probe fails, whatever the ready endpoint says."""
    pids = _stub_pids(server, "sd3_denoiser_1")
    assert pids, "no stub found for sd3_denoiser_1"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    status = probe.Probe(server.http_url, 10)._call("/v2/models/sd3_denoiser_1/ready")[0]
    assert probe.main(["--url", server.http_url, "--family", "sd3", "--timeout", "60"]) == 1
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nafter the kill, sd3_denoiser_1's ready endpoint answered HTTP {status}; the probe said:\n{err}")
    assert "probe FAILED: sd3:" in err, err
