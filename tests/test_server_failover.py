"""The real server when a denoiser stub dies mid-request, when the orchestrator, the text encoder or the VAE is
gone for a while, when a client cancels, and at a deadline.

One server for the module, with explicit model control so that a killed denoiser can be reloaded
between tests and a model taken away and brought back (by the test itself: these tests do not rely on
any supervisor).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from client.generate import generate, is_retryable, make_client, start_generate
from export.make_repository import Deployment, write_repository
from hybridiff.admin import ADMIN_HEADER
from hybridiff.inflight import DOWN_RETRY_SECONDS
from hybridiff.params import Limits
from hybridiff.supervisor import scan_stubs
from tests.helpers import max_pixel_diff
from tools.triton_process import TritonServer

pytestmark = pytest.mark.server

PROMPT = "a watercolor fox in a snowy forest"
STEPS = 120
# eps_slope 0: no slope qualifies, so tau1 = tau_cap and the pipeline runs in steps 91..94.
LATE_PIPELINE = dict(slope_window=3, eps_slope=0.0, k=4, tau_cap=90)
BASE = dict(negative_prompt="blurry", seed=9, steps=STEPS, height=64, width=64, guidance_scale=5.0)


@pytest.fixture(scope="module")
def server(sdxl_tiny, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    deployment = Deployment(devices=2, kind="cpu", limits=Limits(max_height=128, max_width=128, max_steps=200))
    write_repository(repo, {"sdxl": Path(sdxl_tiny)}, deployment)
    with TritonServer(repo, ready_timeout=240) as running:  # explicit model control, as make serve runs
        yield running
        print(running.logs()[-6000:])


def call(server, protocol: str = "http", **fields):
    client = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
    try:
        return generate(client, protocol, "sdxl", [PROMPT], **{**BASE, **fields})
    finally:
        client.close()


def successes(server, model: str) -> int:
    """Requests the model has answered successfully (Triton's statistics)."""
    url = f"http://{server.http_url}/v2/models/{model}/stats"
    stats = json.loads(urllib.request.urlopen(url, timeout=10).read())
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def stub_pid(server, model: str) -> int:
    """The pid of ``model``'s stub process, among this server's processes only."""
    stubs = scan_stubs(server.process.pid).values()
    ours = [stub.pid for stub in stubs if stub.model == model]
    assert len(ours) == 1, (model, sorted((stub.model, stub.pid) for stub in stubs))
    return ours[0]


def kill_stub_during(server, model: str, after_calls: int, request):
    """Run ``request()`` in a thread and SIGKILL ``model``'s stub once it has answered ``after_calls``
    more requests; returns the request's result (or raises its error)."""
    pid, start = stub_pid(server, model), successes(server, model)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = request()
        except BaseException as err:  # re-raised below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: successes(server, model) >= start + after_calls, 120, f"{after_calls} calls on {model}")
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def repository(server, model: str, action: str) -> None:
    """``load`` or ``unload`` ``model`` through the repository API (a load returns once it is loaded)."""
    url = f"http://{server.http_url}/v2/repository/models/{model}/{action}"
    request = urllib.request.Request(url, method="POST", headers={ADMIN_HEADER: server.admin_key})
    urllib.request.urlopen(request, timeout=120).read()


def reload(server, model: str) -> None:
    """Bring a killed model back, as a supervisor would. Unload first: Triton skips a load of a model
    whose files did not change since it was loaded, and leaves the dead stub in place."""
    for action in ("unload", "load"):
        repository(server, model, action)


def reload_and_probe(server, model: str) -> None:
    """Bring the killed model back, then let one request probe it back up once its down mark expired."""
    reload(server, model)
    time.sleep(DOWN_RETRY_SECONDS)
    probe = call(server, mode="cfg_parallel", steps=2).schedules[0]
    assert probe["devices"] == [0, 1] and probe["failover"] == [], probe


@pytest.fixture(scope="module")
def serial_image(server):
    result = call(server, mode="serial")
    assert result.schedules[0]["failover"] == []
    return result.images[0]


@pytest.mark.parametrize("mode,knobs", [("cfg_parallel", {}), ("hybrid", LATE_PIPELINE)])
def test_a_denoiser_killed_mid_request_fails_over_to_the_serial_image(server, serial_image, mode, knobs):
    result = kill_stub_during(server, "sdxl_denoiser_1", 10, lambda: call(server, mode=mode, **knobs))
    schedule = result.schedules[0]
    [failover] = schedule["failover"]
    assert failover["device"] == 1 and failover["continued_on"] == 0
    assert 10 <= failover["step"] < 90, schedule  # after the kill, before any pipeline step
    assert schedule["phases"][failover["step"]:] == ["serial"] * (STEPS - failover["step"])
    assert schedule["mode_requested"] == mode and schedule["devices"] == [0]
    assert max_pixel_diff(result.images[0], serial_image) <= 1
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert any(line.startswith("hybridiff_failovers_total{") and 'device="1"' in line for line in metrics.splitlines())
    # The dead device is marked down: the next request goes to the surviving one at once.
    after = call(server, mode=mode, steps=3, **knobs).schedules[0]
    assert after["devices"] == [0] and after["failover"] == [] and after["mode_run"] == "serial"
    reload_and_probe(server, "sdxl_denoiser_1")


def test_every_device_gone_answers_unavailable_and_retryable(server):
    for device in (0, 1):
        os.kill(stub_pid(server, f"sdxl_denoiser_{device}"), signal.SIGKILL)
    try:
        with pytest.raises(InferenceServerException) as raised:
            call(server, "grpc", mode="hybrid", steps=4)
        assert raised.value.status() == "StatusCode.UNAVAILABLE", raised.value
        assert "no sdxl denoiser device is up" in str(raised.value) and "retry" in str(raised.value)
    finally:
        for device in (0, 1):
            reload(server, f"sdxl_denoiser_{device}")
    time.sleep(DOWN_RETRY_SECONDS)
    for _ in range(2):  # each device is probed by one request and comes back
        assert call(server, mode="serial", steps=2).schedules[0]["failover"] == []
    assert call(server, mode="cfg_parallel", steps=2).schedules[0]["devices"] == [0, 1]


def _denoiser_calls(server) -> int:
    return sum(successes(server, f"sdxl_denoiser_{d}") for d in (0, 1))


def test_a_cancelled_grpc_request_of_the_public_model_stops_within_one_step(server):
    client = make_client("grpc", server.grpc_url)
    try:
        before = _denoiser_calls(server)
        pending = start_generate(client, "sdxl", [PROMPT], **{**BASE, "steps": 200}, mode="cfg_parallel")
        wait_for(lambda: _denoiser_calls(server) >= before + 10, 120, "the run to start")
        at_cancel = _denoiser_calls(server)
        pending.cancel()
        with pytest.raises(InferenceServerException) as raised:
            pending.result(60)
        assert "CANCELLED" in str(raised.value.status()), raised.value
        time.sleep(3)
        after = _denoiser_calls(server)
    finally:
        client.close()
        wait_for(lambda: _denoiser_calls(server) == _settled(server), 120, "the cancelled run to end")
    assert after - at_cancel <= 4, (before, at_cancel, after)
    assert call(server, mode="serial", steps=2).schedules[0]["failover"] == []  # the instance serves again


def _settled(server) -> int:
    """The denoiser call count once it stopped changing for a second."""
    count = _denoiser_calls(server)
    time.sleep(1)
    return count


def test_a_request_timeout_bounds_the_whole_run(server):
    before = _denoiser_calls(server)
    with pytest.raises(InferenceServerException) as raised:
        call(server, "http", mode="cfg_parallel", steps=200, timeout_s=1.0)
    assert raised.value.status() == "503", raised.value
    assert "deadline exceeded: the request's timeout passed before step" in str(raised.value), raised.value
    assert _denoiser_calls(server) - before < 2 * 200  # stopped well before the end


# --- the text encoder or the VAE gone for a while ---------------------------------------------------


def _is_ready(server, model: str) -> bool:
    try:
        return urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/ready", timeout=10).status == 200
    except urllib.error.HTTPError:
        return False


def _unloaded(server, model: str) -> None:
    repository(server, model, "unload")
    wait_for(lambda: not _is_ready(server, model), 60, f"{model} to unload")


def _in_thread(request) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = request()
        except BaseException as err:  # inspected by the test
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_waits_for_a_vae_that_comes_back_after_its_denoising(server, protocol):
    _unloaded(server, "sdxl_vae")
    try:
        before = _denoiser_calls(server)
        thread, outcome = _in_thread(lambda: call(server, protocol, mode="serial", steps=4))
        wait_for(lambda: _denoiser_calls(server) >= before + 4, 120, "the denoising to finish")
        time.sleep(2.0)
        assert thread.is_alive(), outcome  # waiting for the VAE, not failed
    finally:
        repository(server, "sdxl_vae", "load")
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].images.shape == (1, 64, 64, 3)
    assert _denoiser_calls(server) == before + 4  # the work done before the outage was kept, not redone


@pytest.mark.parametrize("model", ["sdxl_text_encoder", "sdxl_orchestrator"])
def test_a_request_waits_for_a_text_encoder_or_orchestrator_that_comes_back(server, model):
    """The orchestrator waits for its text encoder; the public front holds the request while the orchestrator is
    away and sends it once it is back (the schedule says so)."""
    _unloaded(server, model)
    try:
        before = _denoiser_calls(server)
        thread, outcome = _in_thread(lambda: call(server, "grpc", mode="cfg_parallel", steps=3))
        time.sleep(2.0)
        assert thread.is_alive() and _denoiser_calls(server) == before, outcome
    finally:
        repository(server, model, "load")
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    schedule = outcome["result"].schedules[0]
    assert schedule["mode_run"] == "cfg_parallel"
    if model == "sdxl_text_encoder":
        assert schedule["resubmitted"] == []
    else:
        [tries] = schedule["resubmitted"]  # one entry: every try met the unloaded model alike
        assert tries["tries"] >= 3 and "'sdxl_orchestrator' is not ready" in tries["reason"], tries


@pytest.mark.parametrize("model", ["sdxl_text_encoder", "sdxl_vae", "sdxl_orchestrator"])
def test_a_model_still_gone_at_the_request_timeout_answers_unavailable_naming_it(server, model):
    _unloaded(server, model)
    try:
        with pytest.raises(InferenceServerException) as raised:
            call(server, "grpc", mode="serial", steps=2, timeout_s=3.0)
    finally:
        repository(server, model, "load")
    assert raised.value.status() == "StatusCode.UNAVAILABLE", raised.value
    assert f"{model} is unavailable" in str(raised.value) and "retry later" in str(raised.value)
    assert is_retryable(raised.value)
    assert call(server, mode="serial", steps=2).images.shape == (1, 64, 64, 3)


def test_a_cancel_while_waiting_for_a_gone_model_ends_the_request(server):
    _unloaded(server, "sdxl_vae")
    client = make_client("grpc", server.grpc_url)
    try:
        pending = start_generate(client, "sdxl", [PROMPT], **{**BASE, "steps": 2}, mode="serial")
        time.sleep(3.0)  # denoised, now waiting for the VAE
        pending.cancel()
        with pytest.raises(InferenceServerException) as raised:
            pending.result(30)
        assert "CANCELLED" in str(raised.value.status()), raised.value
        # The server ends the request while the VAE is still gone (well before the 60 s wait bound). Triton's
        # statistics count an error answer as a success, so the model's own log line tells.
        stopped = "request cancelled by the client; stopped before decoding the latents"
        wait_for(lambda: stopped in server.logs(), 20, "the cancelled request to end")
    finally:
        client.close()
        repository(server, "sdxl_vae", "load")
