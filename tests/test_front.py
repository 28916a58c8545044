"""The public front (hybridiff/triton/front.py) on a stand-in for Triton's Python-backend module: it passes the
request and the orchestrator's answer on unchanged, sends the request again while the orchestrator is gone,
marks a client's cancel for the orchestrator, and imports without torch. And the plain parts it uses: the
failed-try log, the cancel mark, the request key's check, which errors mean the orchestrator itself is gone."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from hybridiff.inflight import CancelMark, remove_dead_boards
from hybridiff.outage import OutagePolicy, record_try, with_tries
from hybridiff.triton.bls import model_gone
from hybridiff.validation import InvalidParameter, check_request_key

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATOR = "sdxl_orchestrator"
NOT_HEALTHY = "Stub process 'sdxl_orchestrator_0_1' is not healthy."
NOT_READY = ("Model sdxl_orchestrator - Error when running inference: Failed for execute the inference request. "
             "Model 'sdxl_orchestrator' is not ready.")


# --- a stand-in for triton_python_backend_utils ------------------------------------------------------------


class Tensor:
    def __init__(self, name: str, array) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self):
        return self._array


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Reply:
    """What a BLS call answers: tensors, or an error (which Triton 2.51 hands on as INTERNAL)."""

    def __init__(self, tensors=(), error: str | None = None) -> None:
        self.tensors = {t.name(): t for t in tensors}
        self._error = None if error is None else TritonError(error, TritonError.INTERNAL)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self):
        return self._error


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None) -> None:
        self.output_tensors, self.error = list(output_tensors), error


class Orchestrator:
    """The BLS side: records every call and answers from a script of ``(delay_s, reply or callable)``."""

    def __init__(self, script) -> None:
        self.script, self.calls = list(script), []

    async def answer(self, call):
        self.calls.append(call)
        delay, reply = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        await asyncio.sleep(delay)
        return await reply(call) if callable(reply) else reply


def fake_pb(orchestrator: Orchestrator):
    pb = types.ModuleType("triton_python_backend_utils")

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names, timeout=0) -> None:
            self.model_name, self.inputs, self.outputs = model_name, inputs, requested_output_names
            self.timeout = timeout

        async def async_exec(self):
            return await orchestrator.answer(self)

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = Tensor, TritonError, InferenceResponse, \
        InferenceRequest
    pb.TritonModelException = type("TritonModelException", (Exception,), {})
    pb.get_output_tensor_by_name = lambda reply, name: reply.tensors.get(name)
    pb.get_input_tensor_by_name = lambda request, name: next((t for t in request.inputs() if t.name() == name), None)
    pb.Logger = types.SimpleNamespace(log_warn=lambda m: None, log_info=lambda m: None)
    return pb


class ClientRequest:
    def __init__(self, timeout_us: int = 0, cancel_after_s: float | None = None) -> None:
        self._inputs = [Tensor("PROMPT", np.array([b"a fox"], dtype=object)), Tensor("STEPS", np.array([4]))]
        self._timeout_us, self._cancel_at = timeout_us, None
        if cancel_after_s is not None:
            self._cancel_at = time.monotonic() + cancel_after_s

    def inputs(self):
        return self._inputs

    def requested_output_names(self):
        return ["IMAGE", "SCHEDULE"]

    def timeout(self) -> int:
        return self._timeout_us

    def is_cancelled(self) -> bool:
        return self._cancel_at is not None and time.monotonic() >= self._cancel_at


def served(seed: int = 0) -> Reply:
    schedule = json.dumps({"seed": seed, "failover": []}).encode()
    return Reply([Tensor("IMAGE", np.full((1, 2, 2, 3), seed, np.uint8)), Tensor("SCHEDULE", np.array([schedule]))])


def run_front(monkeypatch, script, request: ClientRequest, wait_s: float = 0.5):
    """One request through the front (its board in a temp folder); its response and the orchestrator's calls."""
    import tempfile

    import hybridiff.triton.front as front

    orchestrator = Orchestrator(script)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb(orchestrator))
    folder = Path(tempfile.mkdtemp(prefix="front-"))
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "model_index.json").write_text("{}")
    monkeypatch.setattr(front, "default_board_path", lambda: folder / "board.json")
    model = front.TritonPythonModel()
    params = {"family": "sdxl", "orchestrator": ORCHESTRATOR, "checkpoint": str(folder / "ckpt"), "devices": "2",
              "orchestrator_instances": "4"}
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    model.initialize({"model_config": json.dumps(config), "model_repository": str(folder / "repo" / "sdxl")})
    model.outage = OutagePolicy(first_delay_s=0.01, max_delay_s=0.02, default_wait_s=wait_s)
    [response] = asyncio.run(model.execute([request]))
    return response, orchestrator.calls


def outputs(response) -> dict:
    return {t.name(): t.as_numpy() for t in response.output_tensors}


# --- the front --------------------------------------------------------------------------------------------


def test_the_request_and_the_answer_pass_through_with_a_key_and_the_time_left(monkeypatch):
    response, [call] = run_front(monkeypatch, [(0.0, served(7))], ClientRequest(timeout_us=5_000_000))
    assert response.error is None
    got = outputs(response)
    assert got["IMAGE"].tolist() == served(7).tensors["IMAGE"].as_numpy().tolist()
    assert json.loads(got["SCHEDULE"][0]) == {"seed": 7, "failover": [], "resubmitted": []}
    assert call.model_name == ORCHESTRATOR and call.outputs == ["IMAGE", "SCHEDULE"]
    names = [t.name() for t in call.inputs]
    assert names == ["PROMPT", "STEPS", "REQUEST_KEY"]  # the client's tensors as sent, and the key
    CancelMark(call.inputs[-1].as_numpy()[0].decode())  # a valid key
    assert 4_000_000 < call.timeout <= 5_000_000  # what is left of the client's timeout
    _, [untimed] = run_front(monkeypatch, [(0.0, served())], ClientRequest())
    assert untimed.timeout == 0  # no timeout, no deadline


def test_a_gone_orchestrator_gets_the_request_again_and_the_schedule_says_so(monkeypatch):
    script = [(0.01, Reply(error=NOT_HEALTHY)), (0.0, Reply(error=NOT_READY)), (0.0, Reply(error=NOT_READY)),
              (0.0, served(3))]
    response, calls = run_front(monkeypatch, script, ClientRequest())
    assert response.error is None and len(calls) == 4
    assert len({c.inputs[-1].as_numpy()[0] for c in calls}) == 1  # the same request each time
    [schedule] = [json.loads(s) for s in outputs(response)["SCHEDULE"]]
    tries = schedule["resubmitted"]
    assert [(t["reason"], t["tries"]) for t in tries] == [(NOT_HEALTHY, 1), (NOT_READY, 2)]
    assert 0 < tries[0]["after_s"] <= tries[1]["after_s"]
    assert schedule["seed"] == 3


@pytest.mark.parametrize(
    "answer, code, message",
    [
        ("[INVALID_ARG] STEPS: 0 outside the allowed range [1, 200]", TritonError.INVALID_ARG,
         "STEPS: 0 outside the allowed range [1, 200]"),
        # The orchestrator's own UNAVAILABLE may quote another model's "not healthy": not a reason to send again.
        ("[UNAVAILABLE] sdxl_vae is unavailable (Stub process 'sdxl_vae_0_0' is not healthy.); retry later",
         TritonError.UNAVAILABLE, "sdxl_vae is unavailable (Stub process 'sdxl_vae_0_0' is not healthy.); retry later"),
        ("[CANCELLED] request cancelled by the client; stopped before step 3", TritonError.CANCELLED,
         "request cancelled by the client; stopped before step 3"),
        ("Exceeds maximum queue size", TritonError.UNAVAILABLE, "Exceeds maximum queue size"),
        ("[INTERNAL] sdxl_denoiser_0: denoiser: boom", TritonError.INTERNAL, "sdxl_denoiser_0: denoiser: boom"),
    ],
)
def test_the_orchestrators_errors_reach_the_client_with_their_code_and_are_not_resent(monkeypatch, answer, code,
                                                                                    message):
    response, calls = run_front(monkeypatch, [(0.0, Reply(error=answer))], ClientRequest())
    assert len(calls) == 1
    assert (response.error.code(), response.error.message()) == (code, message)


def test_an_orchestrator_still_gone_at_the_timeout_is_unavailable_naming_it(monkeypatch):
    response, calls = run_front(monkeypatch, [(0.0, Reply(error=NOT_READY))], ClientRequest(timeout_us=200_000))
    assert response.error.code() == TritonError.UNAVAILABLE
    message = response.error.message()
    assert message.startswith(f"{ORCHESTRATOR} is unavailable") and "retry later" in message, message
    assert len(calls) >= 3


def test_without_a_timeout_the_wait_for_the_orchestrator_is_bounded(monkeypatch):
    started = time.monotonic()
    response, _ = run_front(monkeypatch, [(0.0, Reply(error=NOT_HEALTHY))], ClientRequest(), wait_s=0.3)
    assert response.error.code() == TritonError.UNAVAILABLE
    assert 0.3 <= time.monotonic() - started < 2.0


def test_a_client_cancel_is_marked_for_the_orchestrator_which_stops(monkeypatch):
    """The orchestrator stand-in runs until it sees the mark, as the real one checks it between steps."""
    seen = {}

    async def run_until_marked(call):
        mark, give_up = CancelMark(call.inputs[-1].as_numpy()[0].decode()), time.monotonic() + 3.0
        while not mark.is_set():
            if time.monotonic() > give_up:
                return served()  # never marked: the run would have gone to its end
            await asyncio.sleep(0.005)
        seen["marked_at"], seen["path"] = time.monotonic(), mark.path
        return Reply(error="[CANCELLED] request cancelled by the client; stopped before step 5")

    request = ClientRequest(cancel_after_s=0.1)
    cancelled_at = time.monotonic() + 0.1
    response, _ = run_front(monkeypatch, [(0.0, run_until_marked)], request)
    assert response.error is not None and response.error.code() == TritonError.CANCELLED
    assert "stopped before step 5" in response.error.message()
    assert seen["marked_at"] - cancelled_at < 0.2  # polled every CANCEL_POLL_S
    assert not seen["path"].exists()  # the front clears its mark once the orchestrator answered


def test_a_cancel_ends_the_wait_for_a_gone_orchestrator(monkeypatch):
    started = time.monotonic()
    request = ClientRequest(cancel_after_s=0.05)
    response, _ = run_front(monkeypatch, [(0.0, Reply(error=NOT_READY))], request, wait_s=30.0)
    assert response.error.code() == TritonError.CANCELLED
    assert response.error.message() == "request cancelled by the client; stopped before sending it again"
    assert time.monotonic() - started < 1.0


def test_the_front_loads_and_parses_a_request_without_torch():
    """Torch would cost every front instance seconds on its first request (measured: a burst's refusals
    took 2-3 s instead of milliseconds) and its memory for as long as it runs."""
    code = (
        "import sys, types; pb = types.ModuleType('pb'); sys.modules['triton_python_backend_utils'] = pb; "
        "pb.get_input_tensor_by_name = lambda r, n: types.SimpleNamespace(as_numpy=lambda: r[n]) if n in r else None; "
        "import numpy as np; import hybridiff.triton.front as front; "
        "request = {'PROMPT': np.array([b'a fox'], dtype=object), 'STEPS': np.array([4])}; "
        "[image] = front.image_requests_of(request, front.FAMILIES['sdxl'].defaults, front.Limits()); "
        "assert image.steps == 4; assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python_backend"), str(REPO)])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


# --- the plain parts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, ours, gone",
    [
        (NOT_HEALTHY, False, True),
        (NOT_READY, False, True),
        ("Request for unknown model: 'sdxl_orchestrator' has no available versions", False, True),
        # The orchestrator's own answer quoting a gone VAE, and another model's outage: not the orchestrator.
        ("sdxl_vae is unavailable (Stub process 'sdxl_vae_0_0' is not healthy.); retry later", True, False),
        ("Stub process 'sdxl_vae_0_0' is not healthy.", False, False),
        ("KeyError: 'sdxl_orchestrator'", False, False),  # names it, but is not a model being gone
    ],
)
def test_which_errors_mean_the_orchestrator_itself_is_gone(message, ours, gone):
    assert model_gone(ORCHESTRATOR, "INTERNAL", message, ours) is gone


def test_failed_tries_alike_are_counted_in_one_entry_and_added_to_every_schedule():
    log: list[dict] = []
    for reason, at in ((NOT_HEALTHY, 1.0), (NOT_READY, 1.2), (NOT_READY, 1.6), (NOT_HEALTHY, 9.0)):
        record_try(log, reason, at)
    assert log == [{"after_s": 1.0, "tries": 1, "reason": NOT_HEALTHY},
                   {"after_s": 1.2, "tries": 2, "reason": NOT_READY},
                   {"after_s": 9.0, "tries": 1, "reason": NOT_HEALTHY}]
    schedules = with_tries([b'{"seed": 1}', '{"seed": 2}'], log)
    assert [json.loads(s) for s in schedules] == [{"seed": 1, "resubmitted": log}, {"seed": 2, "resubmitted": log}]


def test_a_cancel_mark_is_one_file_per_request_and_server_and_goes_with_a_dead_server(tmp_path):
    key = "0123456789abcdef0123456789abcdef"
    mark = CancelMark(key, tmp_path, server_pid=os.getpid())
    assert not mark.is_set()
    mark.set()
    assert mark.is_set() and CancelMark(key, tmp_path, server_pid=os.getpid()).is_set()
    assert not CancelMark(key, tmp_path, server_pid=os.getpid() + 1).is_set()  # another server's request
    mark.clear()
    assert not mark.is_set()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = CancelMark(key, tmp_path, server_pid=int(finished.stdout))
    dead.set()
    mark.set()
    assert remove_dead_boards(tmp_path) == [dead.path]
    assert mark.is_set()
    for bad in ("../../etc/passwd", key.upper(), key[:-1], ""):
        with pytest.raises(ValueError):
            CancelMark(bad, tmp_path)


def test_the_request_key_is_checked_before_it_names_a_file():
    key = "0123456789abcdef0123456789abcdef"
    assert check_request_key(None) is None  # a direct call of the orchestrator has none
    assert check_request_key(np.array([key.encode()], dtype=object)) == key
    for bad in ([b"../x"], [key.encode(), key.encode()], [b""]):
        with pytest.raises(InvalidParameter, match="REQUEST_KEY: "):
            check_request_key(np.array(bad, dtype=object))
