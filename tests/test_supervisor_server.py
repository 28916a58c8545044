"""The real server with its supervisor: the admin APIs need the key, and a killed stub of any model
is detected, made not ready, and brought back. One server for the module (SDXL tiny, 2 devices)."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from client.generate import generate, generate_with_retry, is_retryable, make_client
from export.make_repository import Deployment, write_repository
from hybridiff.admin import ADMIN_HEADER, GRPC_ADMIN_METADATA
from hybridiff.admission import QueueLimits
from hybridiff.params import Limits
from hybridiff.readiness import http_ready, not_ready, repository_models
from hybridiff.supervisor import Recovery, scan_stubs
from tests.helpers import max_pixel_diff, wait_for
from tools.triton_process import TritonServer

pytestmark = pytest.mark.server

BASE = dict(negative_prompt="blurry", seed=5, steps=6, height=64, width=64, guidance_scale=5.0)
MODES = ("serial", "cfg_parallel", "pipeline", "hybrid")
# docs/operations.md: every mode serves again within 60 s of a kill (the target of issue 10).
RECOVERY_S = 60.0


@pytest.fixture(scope="module")
def server(sdxl_tiny, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    # queue_size 0 (unbounded): the front then has one instance per orchestrator instance, not spare ones
    # besides, so each of two requests at once is held by a known front process (the kill tests below).
    deployment = Deployment(
        devices=2, kind="cpu", orchestrator_instances=2, limits=Limits(max_height=256, max_width=256, max_steps=64),
        queues=QueueLimits(queue_size=0),
    )
    write_repository(repo, {"sdxl": Path(sdxl_tiny)}, deployment)
    with TritonServer(repo, ready_timeout=300, supervise=True) as running:
        yield running
        print(running.logs()[-6000:])


def http(server, path: str, method: str = "GET", key: str | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(f"http://{server.http_url}{path}", method=method, data=body)
    if key is not None:
        request.add_header(ADMIN_HEADER, key)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def call(server, protocol: str = "http", **fields):
    client = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
    try:
        return generate(client, protocol, "sdxl", ["a paper boat on a pond"], **{**BASE, **fields})
    finally:
        client.close()


def stub_pids(server, model: str) -> list[int]:
    return sorted(s.pid for s in scan_stubs(server.process.pid).values() if s.model == model)



def recovery_of(server, model: str, after: int) -> Recovery | None:
    done = [r for r in server.supervisor.recoveries()[after:] if r.model == model]
    return done[0] if done else None


def kill_and_wait(server, model: str) -> tuple[Recovery, bool]:
    """SIGKILL one stub of ``model``; return its recovery and whether its ready endpoint said 400 meanwhile."""
    seen = len(server.supervisor.recoveries())
    [pid, *_] = stub_pids(server, model)
    os.kill(pid, signal.SIGKILL)
    went_down = wait_for(lambda: http(server, f"/v2/models/{model}/ready") == 400, 10.0)
    assert wait_for(lambda: recovery_of(server, model, seen) is not None, RECOVERY_S, 0.5), server.logs()[-3000:]
    assert pid not in stub_pids(server, model)
    return recovery_of(server, model, seen), went_down


# --- the admin surface -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v2/repository/index", b""),
        ("GET", "/v2/logging", None),
        ("POST", "/v2/logging", b'{"log_verbose_level": 0}'),
        ("GET", "/v2/systemsharedmemory/status", None),
        ("GET", "/v2/trace/setting", None),
    ],
)
def test_admin_http_apis_need_the_key(server, method, path, body):
    assert http(server, path, method, body=body) == 403
    assert http(server, path, method, key="wrong-key-0123456789", body=body) == 403
    assert http(server, path, method, key=server.admin_key, body=body) == 200


def test_admin_grpc_apis_need_the_key(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for request in (client.get_log_settings, client.get_model_repository_index,
                        client.get_system_shared_memory_status, client.get_trace_settings):
            with pytest.raises(InferenceServerException, match="restricted"):
                request()
            request(headers={GRPC_ADMIN_METADATA: server.admin_key})
        assert client.is_server_ready() and client.get_model_metadata("sdxl").name == "sdxl"  # open to all
    finally:
        client.close()


def test_inference_health_metadata_and_metrics_stay_open(server):
    assert http(server, "/v2/health/ready") == 200
    assert http(server, "/v2/models/sdxl") == 200
    assert urllib.request.urlopen(server.metrics_url, timeout=10).status == 200
    assert call(server, mode="serial").images.shape == (1, 64, 64, 3)


def test_the_server_listens_on_loopback_only(server):
    """Every port of the server is bound to a loopback address (IPv4, or IPv4-mapped IPv6), none to 0.0.0.0."""
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    bound: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                address, port = local.split(":")
                bound.setdefault(int(port, 16), set()).add(address)
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        assert bound.get(port) and bound[port] <= loopback, (port, bound.get(port))


# --- self-healing ----------------------------------------------------------------------------------


def test_killed_denoiser_is_not_ready_until_brought_back_then_serves_every_mode(server):
    started = time.monotonic()
    recovery, went_down = kill_and_wait(server, "sdxl_denoiser_1")
    assert went_down  # readiness told the truth while the model was down
    assert recovery.instances == ["sdxl_denoiser_1_0_0"] and recovery.unloaded_at is not None
    assert http(server, "/v2/models/sdxl_denoiser_1/ready") == 200 and server.is_ready()
    for mode in MODES:
        assert call(server, mode=mode).schedules[0]["mode_run"] == mode
    assert time.monotonic() - started <= RECOVERY_S


def test_readiness_probe_fails_until_the_model_is_back(server):
    """The probe (every model of the repository ready) is what tells the truth: Triton's own server
    readiness is 400 only while the unload runs, and the public model's says nothing of the models it calls."""
    models = repository_models(server.model_repository, "sdxl")
    ready = http_ready(server.http_url)
    assert not_ready(models, ready) == []
    [pid] = stub_pids(server, "sdxl_denoiser_0")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: "sdxl_denoiser_0" in not_ready(models, ready), 10.0)
    assert wait_for(lambda: not_ready(models, ready) == [], RECOVERY_S, 0.5)
    assert call(server, mode="cfg_parallel").schedules[0]["mode_run"] == "cfg_parallel"


@pytest.mark.parametrize("model", ["sdxl_text_encoder", "sdxl_vae", "sdxl_orchestrator", "sdxl"])
def test_killed_text_encoder_vae_orchestrator_and_front_come_back(server, model):
    instances = len(stub_pids(server, model))
    recovery, _ = kill_and_wait(server, model)
    assert len(recovery.instances) == 1
    # Every instance is back, and no old one is left over (the survivors of a partly dead model exit
    # once Triton has finished unloading it).
    assert wait_for(lambda: len(stub_pids(server, model)) == instances, 30.0, 0.5), stub_pids(server, model)
    assert call(server, "grpc", mode="hybrid").images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("model", ["sdxl_text_encoder", "sdxl_vae"])
def test_a_request_meeting_a_killed_text_encoder_or_vae_is_served_once_the_supervisor_brings_it_back(server, model):
    """No client retry: the public model waits for the model it calls (hybridiff.outage), so a request accepted
    while that model is dead or reloading is answered once it is back."""
    seen = len(server.supervisor.recoveries())
    [pid] = stub_pids(server, model)
    os.kill(pid, signal.SIGKILL)
    sent = time.monotonic()
    result = call(server, "grpc", mode="cfg_parallel")
    assert result.images.shape == (1, 64, 64, 3) and result.schedules[0]["mode_run"] == "cfg_parallel"
    assert wait_for(lambda: recovery_of(server, model, seen) is not None, RECOVERY_S, 0.5)
    recovery = recovery_of(server, model, seen)
    assert sent < recovery.loaded_at  # it was sent while the model was dead, unloaded or loading


LONG = dict(steps=48, height=128, width=128, mode="serial")
SEEDS = (11, 12)


def _two_long_requests_and_a_kill(server, model: str) -> tuple[dict[int, object], Recovery]:
    """Two long requests at once, one per instance of ``model`` (2 of each), and one instance SIGKILLed while
    both run: each request's result or error, by seed, and the model's recovery."""
    outcomes: dict[int, object] = {}

    def run(seed: int) -> None:
        try:
            outcomes[seed] = call(server, "grpc", **{**LONG, "seed": seed})
        except Exception as err:  # inspected by the test
            outcomes[seed] = err

    threads = [threading.Thread(target=run, args=(seed,)) for seed in SEEDS]
    for thread in threads:
        thread.start()
    pids = stub_pids(server, model)
    assert len(pids) == 2
    time.sleep(1.0)  # both requests are in their denoising loops by now
    seen = len(server.supervisor.recoveries())
    os.kill(pids[0], signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(outcomes) == list(SEEDS), outcomes
    assert wait_for(lambda: recovery_of(server, model, seen) is not None, RECOVERY_S, 0.5), server.logs()[-3000:]
    return outcomes, recovery_of(server, model, seen)


def test_a_killed_orchestrator_loses_no_request(server):
    """The request the killed orchestrator instance held is sent again by the public front once the supervisor
    has the orchestrator back: it succeeds, with the image of the same request served normally, and its
    schedule says so; the request on the other instance is not touched."""
    normal = {seed: call(server, **{**LONG, "seed": seed}) for seed in SEEDS}
    outcomes, recovery = _two_long_requests_and_a_kill(server, "sdxl_orchestrator")
    errors = [o for o in outcomes.values() if isinstance(o, BaseException)]
    assert not errors, errors
    resent = [seed for seed in SEEDS if outcomes[seed].schedules[0]["resubmitted"]]
    assert len(resent) == 1, [outcomes[seed].schedules[0]["resubmitted"] for seed in SEEDS]
    [first, *_] = outcomes[resent[0]].schedules[0]["resubmitted"]
    assert first["reason"] == f"Stub process '{recovery.instances[0]}' is not healthy.", first
    for seed in SEEDS:
        assert max_pixel_diff(outcomes[seed].images[0], normal[seed].images[0]) <= 1, seed
    assert call(server, mode="hybrid").schedules[0]["resubmitted"] == []  # the orchestrator serves again


def test_a_killed_front_loses_only_the_request_it_held(server):
    """The public front's own death loses its one request (INTERNAL "not healthy": nothing is left to answer
    for it), which the client retries; the request on the other front instance completes."""
    outcomes, _ = _two_long_requests_and_a_kill(server, "sdxl")
    errors = [o for o in outcomes.values() if isinstance(o, BaseException)]
    assert len(errors) == 1, outcomes
    assert "is not healthy" in str(errors[0]) and is_retryable(errors[0]), errors[0]
    client = make_client("grpc", server.grpc_url)
    try:
        retried = generate_with_retry(client, "grpc", "sdxl", ["a paper boat on a pond"], **{**BASE, **LONG})
    finally:
        client.close()
    assert retried.images.shape == (1, 128, 128, 3)
