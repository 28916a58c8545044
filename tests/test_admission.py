"""Admission decisions (plain Python) and the queue policy the repository carries."""

from __future__ import annotations

import asyncio

import pytest

from export.make_repository import Deployment, family_models, main
from hybridiff.admission import FULL, QueueLimits, admit, refusal, start_budget_s
from hybridiff.wire import FAMILIES


def test_refusal_only_when_every_device_is_at_the_limit():
    assert refusal([2, 2], 2).startswith(FULL)
    assert "2 requests" in refusal([3, 2], 2)
    assert refusal([2, 1], 2) is None
    assert refusal([0, 0], 1) is None
    assert refusal([9, 9], 0) is None  # gate off


def test_start_budget_is_the_clients_timeout_else_the_default():
    limits = QueueLimits(start_timeout_us=3_000_000)
    assert start_budget_s(0, limits) == 3.0
    assert start_budget_s(500_000, limits) == 0.5


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def run_admit(loads_seq: list[list[int]], limits: QueueLimits, timeout_us: int = 0) -> tuple[str | None, FakeClock]:
    clock = FakeClock()
    calls = iter(loads_seq)
    last = [loads_seq[-1]]

    def loads() -> list[int]:
        last[0] = next(calls, last[0])
        return last[0]

    result = asyncio.run(admit(loads, limits, timeout_us, poll_s=0.1, sleep=clock.sleep, clock=clock))
    return result, clock


def test_admit_starts_at_once_when_there_is_room_or_the_gate_is_off():
    result, clock = run_admit([[1, 0]], QueueLimits(max_per_device=1))
    assert result is None and clock.slept == []
    result, clock = run_admit([[5, 5]], QueueLimits(max_per_device=0))
    assert result is None and clock.slept == []


def test_a_held_request_starts_when_a_device_frees_within_its_budget():
    result, clock = run_admit([[2, 2], [2, 2], [2, 2], [1, 2]], QueueLimits(max_per_device=2, start_timeout_us=10**6))
    assert result is None
    assert clock.now == pytest.approx(0.3)


def test_a_held_request_that_cannot_start_within_its_deadline_is_refused_at_the_deadline():
    result, clock = run_admit([[2, 2]], QueueLimits(max_per_device=2, start_timeout_us=60 * 10**6), timeout_us=250_000)
    assert result is not None and result.startswith(FULL) and "retry" in result
    assert clock.now == pytest.approx(0.25)  # the client's own, shorter deadline, not the default


def test_no_budget_refuses_at_once():
    result, clock = run_admit([[1, 1]], QueueLimits(max_per_device=1, start_timeout_us=0))
    assert result is not None and clock.slept == []


def test_negative_limits_are_rejected_naming_the_field():
    with pytest.raises(ValueError, match="queue_size: -1"):
        QueueLimits(queue_size=-1).validate()
    with pytest.raises(SystemExit):
        main(["--model", "sdxl=x", "--out", "/nonexistent/never", "--start-timeout-us", "-5"])


def configs(deployment: Deployment) -> dict[str, str]:
    return {name: config for name, (config, _) in family_models(FAMILIES["sdxl"], "ckpt", deployment).items()}


def test_public_path_models_carry_a_bounded_queue_and_only_the_public_model_a_start_deadline():
    deployment = Deployment(orchestrator_instances=4, queues=QueueLimits(queue_size=3, start_timeout_us=7_000_000))
    found = configs(deployment)
    public = found["sdxl"]
    # The front holds the 4 running requests and the 3 that may wait (each priced on arrival), with 3 spare
    # instances to refuse the arrivals beyond at once, and a Triton queue as long for bursts.
    assert "instance_group [ { count: 10 kind: KIND_CPU } ]" in public
    assert 'key: "queue_size" value: { string_value: "3" }' in public
    assert "max_queue_size: 10 default_timeout_microseconds: 7000000 timeout_action: REJECT" in public
    assert "allow_timeout_override: true" in public
    # The 7 it holds call the orchestrator, whose 4 instances call the encoder and the VAE.
    assert "max_queue_size: 7 default_timeout_microseconds: 0 timeout_action: REJECT" in found["sdxl_orchestrator"]
    for name in ("sdxl_text_encoder", "sdxl_vae"):
        assert "max_queue_size: 4 default_timeout_microseconds: 0 timeout_action: REJECT" in found[name]
    assert "queue_policy" not in found["sdxl_denoiser_0"]  # internal: a refusal there would waste a request
    assert 'key: "start_timeout_us" value: { string_value: "7000000" }' in found["sdxl_orchestrator"]  # its gate


def test_queue_size_zero_leaves_the_public_queue_unbounded_and_the_internal_ones_at_the_instances():
    found = configs(Deployment(orchestrator_instances=3, queues=QueueLimits(queue_size=0)))
    assert "max_queue_size: 0 " in found["sdxl"]
    for name in ("sdxl_orchestrator", "sdxl_text_encoder", "sdxl_vae"):
        assert "max_queue_size: 3 " in found[name]


def test_the_container_passes_the_admission_variables_to_the_generator():
    from deploy.entrypoint import repository_argv

    env = {"HYBRIDIFF_MODELS": "sdxl=/m", "HYBRIDIFF_QUEUE_SIZE": "1", "HYBRIDIFF_START_TIMEOUT_US": "5000000",
           "HYBRIDIFF_MAX_PER_DEVICE": "2"}
    argv = repository_argv(env)
    assert argv[argv.index("--queue-size") + 1] == "1"
    assert argv[argv.index("--start-timeout-us") + 1] == "5000000"
    assert argv[argv.index("--max-per-device") + 1] == "2"
    assert "--queue-size" not in repository_argv({"HYBRIDIFF_MODELS": "sdxl=/m"})  # the generator's default
