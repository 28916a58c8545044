"""What the command-line client prints about the schedule a request ran, and what it retries."""

import pytest
from tritonclient.utils import InferenceServerException

from client import generate as generate_module
from client.generate import _summary, backoff_delays, generate_with_retry, is_retryable


def test_summary_reports_mode_phases_and_the_cost_of_load_checks():
    schedule = {
        "mode_run": "hybrid", "mode_requested": "auto", "tau1": 15, "tau2": 20, "tau_source": "slope",
        "phase_steps": {"partition": 45, "warmup": 1, "pipeline": 4},
        "phase_seconds": {"partition": 14.0, "warmup": 0.3, "pipeline": 0.7},
        "overhead_seconds": 0.21, "placement_seconds": 0.0035,
    }
    line = _summary(schedule)
    assert line.startswith("mode hybrid (asked auto); tau1=15 tau2=20 (slope)")
    assert "steps partition 45, warmup 1, pipeline 4" in line
    assert line.endswith("overhead 0.210s (load checks 0.0035s)")


# --- retrying what a model being brought back answers ----------------------------------------------


DEAD_STUB = InferenceServerException(
    "in ensemble 'sdxl', Stub process 'sdxl_orchestrator_0_1' is not healthy.", status="StatusCode.INTERNAL"
)
UNLOADED = InferenceServerException(
    "in ensemble 'sdxl', sdxl_denoiser_1: Model sdxl_denoiser_1 - Error when running inference: Failed for "
    "execute the inference request. Model 'sdxl_denoiser_1' is not ready.", status="500"
)
BAD_INPUT = InferenceServerException("HEIGHT must be a multiple of 8 in [64, 1024], got 65", status="400")


def test_retryable_errors_are_those_of_a_model_coming_back():
    assert is_retryable(DEAD_STUB) and is_retryable(UNLOADED)
    assert is_retryable(InferenceServerException("Request for unknown model: 'sdxl' has no available versions",
                                                 status="StatusCode.NOT_FOUND"))
    assert not is_retryable(InferenceServerException("Request for unknown model: 'sdx' is not found", status="404"))
    assert is_retryable(InferenceServerException("no devices left", status="StatusCode.UNAVAILABLE"))
    assert not is_retryable(BAD_INPUT)
    deadline = "deadline exceeded: the request's timeout passed before step 3 (Request timeout expired)"
    assert not is_retryable(InferenceServerException(deadline, status="StatusCode.UNAVAILABLE"))
    assert not is_retryable(ValueError("protocol must be http or grpc"))


def test_backoff_doubles_to_a_cap_and_is_bounded():
    assert backoff_delays(5, base_s=1, cap_s=8) == [1, 2, 4, 8, 8]
    assert backoff_delays(0) == []
    with pytest.raises(ValueError, match="retries"):
        backoff_delays(-1)


def fake_generate(outcomes):
    calls = []

    def run(*args, **kwargs):
        calls.append(kwargs)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return run, calls


def test_generate_with_retry_waits_out_a_reload(monkeypatch):
    run, calls = fake_generate([DEAD_STUB, UNLOADED, "image"])
    monkeypatch.setattr(generate_module, "generate", run)
    waits, seen = [], []
    result = generate_with_retry(None, "grpc", "sdxl", ["p"], retries=4, backoff_s=0.5, sleep=waits.append,
                                 on_retry=lambda n, err, delay: seen.append(n), mode="hybrid")
    assert result == "image" and len(calls) == 3 and calls[0] == {"mode": "hybrid"}
    assert waits == [0.5, 1.0] and seen == [1, 2]


def test_generate_with_retry_gives_up_after_its_retries_and_never_retries_bad_input(monkeypatch):
    run, calls = fake_generate([DEAD_STUB] * 3)
    monkeypatch.setattr(generate_module, "generate", run)
    with pytest.raises(InferenceServerException, match="not healthy"):
        generate_with_retry(None, "http", "sdxl", ["p"], retries=2, sleep=lambda s: None)
    assert len(calls) == 3

    run, calls = fake_generate([BAD_INPUT, "image"])
    monkeypatch.setattr(generate_module, "generate", run)
    with pytest.raises(InferenceServerException, match="HEIGHT"):
        generate_with_retry(None, "http", "sdxl", ["p"], sleep=lambda s: None)
    assert len(calls) == 1


def test_summary_reports_a_failover():
    schedule = {
        "mode_run": "serial", "mode_requested": "cfg_parallel", "tau1": None, "tau2": None, "tau_source": None,
        "phase_steps": {"partition": 3, "serial": 5}, "phase_seconds": {"partition": 1.0, "serial": 2.0},
        "overhead_seconds": 0.1, "placement_seconds": 0.0,
        "failover": [{"device": 1, "step": 3, "continued_on": 0}],
    }
    assert _summary(schedule).endswith("device 1 failed at step 3, went on on device 0")
