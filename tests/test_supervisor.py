"""The supervisor's decisions and loop, and the admin key, without a server: a fake /proc and a fake
repository API stand in for tritonserver."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hybridiff.admin import ADMIN_KEY_ENV, RESTRICTED_GROUPS, admin_args, resolve_admin_key, validate_key
from hybridiff.supervisor import (
    Stub,
    Supervisor,
    configured_instances,
    dead_models,
    group_by_model,
    parse_stub,
    retry_delay,
    scan_stubs,
    short_models,
)

SERVER = 100
KEY = "k" * 20


def stub_argv(model: str, instance: str, region: str = "triton_python_backend_shm_region_x") -> list[str]:
    """A stub command line as python_backend r24.10 builds it (seen in ``ps`` on the bundled server)."""
    return [
        "/tmp/be/python/triton_python_backend_stub",
        f"/srv/model_repository/{model}/1/model.py",
        region,
        "16777216",
        "16777216",
        str(SERVER),
        "/tmp/be/python",
        "336",
        instance,
        "DEFAULT",
    ]


def add_process(root: Path, pid: int, argv: list[str], ppid: int = SERVER, state: str = "S") -> None:
    proc = root / str(pid)
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text(f"{pid} (triton python) {state} {ppid} {ppid} 0 0\n")
    (proc / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def kill(root: Path, pid: int) -> None:
    """What SIGKILL leaves: a zombie that tritonserver never reaps (its cmdline is empty)."""
    (root / str(pid) / "stat").write_text(f"{pid} (triton_python_b) Z {SERVER} {SERVER} 0 0\n")
    (root / str(pid) / "cmdline").write_bytes(b"")


# --- decisions -------------------------------------------------------------------------------------


def test_parse_stub_reads_model_instance_and_region() -> None:
    stub = parse_stub(7, stub_argv("sdxl_denoiser_1", "sdxl_denoiser_1_0_0", "triton_python_backend_shm_region_ab"))
    assert stub == Stub(7, "sdxl_denoiser_1", "sdxl_denoiser_1_0_0", "triton_python_backend_shm_region_ab")


@pytest.mark.parametrize(
    "argv",
    [[], ["/usr/bin/bash", "-c", "x"], ["/x/triton_python_backend_stub", "too", "short"],
     ["/x/tritonserver", *stub_argv("m", "m_0")[1:]]],
)
def test_parse_stub_ignores_other_processes(argv: list[str]) -> None:
    assert parse_stub(1, argv) is None


def test_scan_stubs_keeps_live_children_of_the_server(tmp_path: Path) -> None:
    add_process(tmp_path, 11, stub_argv("sdxl_vae", "sdxl_vae_0_0"))
    add_process(tmp_path, 12, stub_argv("sdxl", "sdxl_0_0"))
    add_process(tmp_path, 13, stub_argv("sdxl", "sdxl_0_1"))
    add_process(tmp_path, 14, stub_argv("other_model", "other_0_0"), ppid=999)  # another server's stub
    add_process(tmp_path, 15, ["/bin/sleep", "10"])  # not a stub
    add_process(tmp_path, 16, stub_argv("sdxl_text_encoder", "sdxl_text_encoder_0_0"))
    kill(tmp_path, 16)
    stubs = scan_stubs(SERVER, tmp_path)
    assert sorted(stubs) == [11, 12, 13]
    assert group_by_model(stubs) == {"sdxl_vae": frozenset({11}), "sdxl": frozenset({12, 13})}


def test_dead_models_one_lost_instance_is_enough() -> None:
    watched = {"a": {1}, "b": {2, 3}, "c": {4}}
    assert dead_models(watched, {1, 2, 3, 4}) == []
    assert dead_models(watched, {1, 2, 4}) == ["b"]
    assert dead_models(watched, set()) == ["a", "b", "c"]


def test_configured_instances_counts_the_stubs_a_python_model_starts() -> None:
    assert configured_instances({"backend": "python", "instance_group": [{"count": 3, "kind": "KIND_CPU"}]}) == 3
    gpu = {"backend": "python", "instance_group": [{"count": 2, "kind": "KIND_GPU", "gpus": [0, 1]}]}
    assert configured_instances(gpu) == 4
    assert configured_instances({"platform": "ensemble", "backend": ""}) == 0


def test_short_models_are_those_missing_a_stub() -> None:
    live = {"sdxl_vae": frozenset({1}), "sdxl_orchestrator": frozenset({2, 3})}
    expected = {"sdxl_vae": 1, "sdxl_orchestrator": 3, "sdxl_text_encoder": 1}
    assert short_models(expected, live) == ["sdxl_orchestrator", "sdxl_text_encoder"]


def test_retry_delay_doubles_to_a_cap() -> None:
    assert [retry_delay(n, base_s=1, cap_s=10) for n in range(7)] == [0, 1, 2, 4, 8, 10, 10]


# --- the loop, against a fake server ---------------------------------------------------------------


class FakeRepository:
    """Records calls; ``load`` starts new stubs in the fake /proc, or fails ``failures`` times first."""

    def __init__(self, root: Path, failures: int = 0, expected: dict[str, int] | None = None) -> None:
        self.root = root
        self.expected = expected or {}
        self.census_failures = 0
        self.calls: list[tuple[str, str]] = []
        self.failures = failures
        self.next_pid = 500

    def expected_stubs(self) -> dict[str, int]:
        if self.census_failures > 0:
            self.census_failures -= 1
            raise ConnectionError("repository index answered 503")
        return dict(self.expected)

    def unload(self, model: str) -> tuple[int, str]:
        self.calls.append(("unload", model))
        return 200, ""

    def load(self, model: str) -> tuple[int, str]:
        self.calls.append(("load", model))
        if self.failures > 0:
            self.failures -= 1
            return 400, "failed to load: out of memory"
        self.next_pid += 1
        add_process(self.root, self.next_pid, stub_argv(model, f"{model}_0_0"))
        return 200, ""


def make_supervisor(tmp_path: Path, repository: FakeRepository) -> tuple[Supervisor, list[str]]:
    lines: list[str] = []
    shm = tmp_path / "shm"
    shm.mkdir()
    supervisor = Supervisor(SERVER, "127.0.0.1:1", KEY, log=lines.append, proc_root=tmp_path / "proc", shm_dir=shm)
    supervisor.repository = repository  # type: ignore[assignment]
    return supervisor, lines


def test_dead_stub_is_unloaded_then_loaded_and_its_shm_unlinked(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    add_process(proc, 11, stub_argv("sdxl_denoiser_0", "sdxl_denoiser_0_0_0"))
    add_process(proc, 12, stub_argv("sdxl_denoiser_1", "sdxl_denoiser_1_0_0", "triton_python_backend_shm_region_d1"))
    repository = FakeRepository(proc)
    supervisor, lines = make_supervisor(tmp_path, repository)
    (tmp_path / "shm" / "triton_python_backend_shm_region_d1").write_bytes(b"x")

    assert supervisor.poll_once() == []
    assert set(supervisor.watched) == {"sdxl_denoiser_0", "sdxl_denoiser_1"}
    assert repository.calls == []

    kill(proc, 12)
    assert supervisor.poll_once() == ["sdxl_denoiser_1"]
    assert repository.calls == [("unload", "sdxl_denoiser_1"), ("load", "sdxl_denoiser_1")]
    assert not (tmp_path / "shm" / "triton_python_backend_shm_region_d1").exists()
    assert set(supervisor.watched["sdxl_denoiser_1"]) == {501}  # the new stub is watched
    [recovery] = supervisor.recoveries()
    assert recovery.instances == ["sdxl_denoiser_1_0_0"] and recovery.attempts == 1
    assert recovery.seconds is not None and recovery.seconds >= 0
    assert any("sdxl_denoiser_1_0_0 (pid 12) died" in line for line in lines)

    assert supervisor.poll_once() == []  # nothing more to do
    assert len(repository.calls) == 2


def test_failed_load_is_retried_after_a_delay_and_the_model_stays_unloaded(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    add_process(proc, 11, stub_argv("sd3_vae", "sd3_vae_0_0"))
    repository = FakeRepository(proc, failures=1)
    supervisor, lines = make_supervisor(tmp_path, repository)
    supervisor.poll_once()
    kill(proc, 11)

    supervisor.poll_once()
    assert repository.calls == [("unload", "sd3_vae"), ("load", "sd3_vae")]
    assert supervisor.is_recovering() and "sd3_vae" not in supervisor.watched
    assert any("retry in 1 s" in line for line in lines)

    supervisor.poll_once()  # too early: no second load yet
    assert repository.calls.count(("load", "sd3_vae")) == 1

    supervisor.next_attempt["sd3_vae"] = 0.0  # the delay has passed
    supervisor.poll_once()
    assert repository.calls.count(("load", "sd3_vae")) == 2
    assert not supervisor.is_recovering()
    [recovery] = supervisor.recoveries()
    assert recovery.attempts == 2 and recovery.errors == ["load 400: failed to load: out of memory"]


def test_one_dead_orchestrator_instance_reloads_the_model(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for i in range(3):
        add_process(proc, 20 + i, stub_argv("sdxl", f"sdxl_0_{i}"))
    repository = FakeRepository(proc)
    supervisor, _ = make_supervisor(tmp_path, repository)
    supervisor.poll_once()
    kill(proc, 21)
    assert supervisor.poll_once() == ["sdxl"]
    assert supervisor.recoveries()[0].instances == ["sdxl_0_1"]


# --- admin key -------------------------------------------------------------------------------------


def test_generated_key_is_written_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "build" / "admin-key"
    key = resolve_admin_key(path, environ={})
    assert path.read_text().strip() == key and len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_admin_key(path, environ={}) != key  # a fresh one per start


def test_operator_key_comes_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "admin-key"
    path.write_text("old")
    path.chmod(0o644)
    assert resolve_admin_key(path, environ={ADMIN_KEY_ENV: "operator-key-0123456789"}) == "operator-key-0123456789"
    assert path.read_text().strip() == "operator-key-0123456789"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("key", ["short", "has:colon-0123456789", "has=equals-0123456789", "has,comma-0123456789"])
def test_bad_keys_are_refused_with_the_variable_named(key: str) -> None:
    with pytest.raises(ValueError, match=ADMIN_KEY_ENV):
        validate_key(key)


def test_admin_args_restrict_both_protocols_and_listen_where_told() -> None:
    args = admin_args(KEY)
    groups = ",".join(RESTRICTED_GROUPS)
    assert f"--http-restricted-api={groups}:admin-key={KEY}" in args
    assert f"--grpc-restricted-protocol={groups}:admin-key={KEY}" in args
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(args)
    assert "--model-control-mode=explicit" in args and "--load-model=*" in args
    assert "--http-address=0.0.0.0" in admin_args(KEY, "0.0.0.0")
    for open_group in ("inference", "health", "metadata"):
        assert open_group not in groups


# --- the launcher's command line (no server: exec is intercepted) ----------------------------------


def test_launcher_passes_the_key_and_address_and_keeps_the_key_off_its_output(tmp_path, monkeypatch, capsys):
    from hybridiff import tritonserver

    repo = tmp_path / "repo"
    repo.mkdir()
    execs: list[list[str]] = []
    monkeypatch.setattr(tritonserver.os, "execve", lambda path, cmd, env: execs.append(cmd))
    monkeypatch.setenv(ADMIN_KEY_ENV, "operator-key-0123456789")
    key_file = tmp_path / "admin-key"
    tritonserver.main(["--model-repository", str(repo), "--backend-dir", str(tmp_path / "be"), "--no-supervise",
                       "--admin-key-file", str(key_file), "--listen", "0.0.0.0"])
    [cmd] = execs
    assert "--http-address=0.0.0.0" in cmd and "--grpc-address=0.0.0.0" in cmd and "--metrics-address=0.0.0.0" in cmd
    assert any(a.endswith(":admin-key=operator-key-0123456789") for a in cmd if a.startswith("--http-restricted"))
    assert key_file.read_text().strip() == "operator-key-0123456789"
    out = capsys.readouterr().out
    assert "operator-key-0123456789" not in out and "<admin-key-hidden>" in out


def test_launcher_refuses_a_bad_key_naming_the_variable(tmp_path, monkeypatch, capsys):
    from hybridiff import tritonserver

    (tmp_path / "repo").mkdir()
    monkeypatch.setenv(ADMIN_KEY_ENV, "short")
    with pytest.raises(SystemExit):
        tritonserver.main(["--model-repository", str(tmp_path / "repo"), "--admin-key-file", str(tmp_path / "k")])
    assert ADMIN_KEY_ENV in capsys.readouterr().err


def test_surviving_stubs_of_a_reloaded_model_are_not_watched_as_new(tmp_path: Path) -> None:
    """Measured on 2.51: after one of two orchestrator instances is killed and the model reloaded, the
    survivor's stub is still alive next to the new ones for a while. Its exit is no new fault."""
    proc = tmp_path / "proc"
    for i in range(2):
        add_process(proc, 20 + i, stub_argv("sdxl", f"sdxl_0_{i}"))
    repository = FakeRepository(proc)
    supervisor, _ = make_supervisor(tmp_path, repository)
    supervisor.poll_once()
    kill(proc, 20)
    supervisor.poll_once()
    assert set(supervisor.watched["sdxl"]) == {501}  # not the survivor 21
    kill(proc, 21)  # the survivor goes when Triton finishes unloading the old model
    assert supervisor.poll_once() == []
    assert repository.calls.count(("load", "sdxl")) == 1


# --- the readiness probe ---------------------------------------------------------------------------


def test_probe_names_what_is_not_ready(tmp_path: Path) -> None:
    from hybridiff.readiness import not_ready, repository_models

    for name in ("sdxl", "sdxl_vae", "sdxl_denoiser_0", "sd3", "sd3_vae"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text("")
    (tmp_path / "notes").mkdir()  # no config: not a model
    assert repository_models(tmp_path) == ["sd3", "sd3_vae", "sdxl", "sdxl_denoiser_0", "sdxl_vae"]
    assert repository_models(tmp_path, "sdxl") == ["sdxl", "sdxl_denoiser_0", "sdxl_vae"]

    # Triton after the supervisor unloaded sdxl_vae: the server says ready again, the model does not.
    answers = {"/v2/health/ready": True, "/v2/models/sdxl_vae/ready": False}
    models = repository_models(tmp_path, "sdxl")
    assert not_ready(models, lambda path: answers.get(path, True)) == ["sdxl_vae"]
    assert not_ready(models, lambda path: True) == []
    assert not_ready(["sd3"], lambda path: False) == ["server", "sd3"]


def test_nothing_is_reloaded_once_a_stop_is_requested(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    add_process(proc, 11, stub_argv("sdxl_vae", "sdxl_vae_0_0"))
    repository = FakeRepository(proc)
    supervisor, _ = make_supervisor(tmp_path, repository)
    supervisor.poll_once()
    supervisor.request_stop()  # the server got SIGTERM: its stubs exit now
    kill(proc, 11)
    assert supervisor.poll_once() == [] and repository.calls == []


def test_stub_dead_before_the_first_scan_is_found_by_the_census(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    add_process(proc, 11, stub_argv("sdxl_vae", "sdxl_vae_0_0"))
    add_process(proc, 12, stub_argv("sdxl_orchestrator", "sdxl_orchestrator_0_0"))
    add_process(proc, 13, stub_argv("sdxl_orchestrator", "sdxl_orchestrator_0_1"))
    kill(proc, 13)  # died between readiness and the first scan: never watched
    repository = FakeRepository(proc, expected={"sdxl_vae": 1, "sdxl_orchestrator": 2})
    repository.census_failures = 1
    supervisor, lines = make_supervisor(tmp_path, repository)

    assert supervisor.poll_once() == []  # the census failed: nothing decided, retried next poll
    assert any("census" in line and "retrying" in line for line in lines)
    assert supervisor.poll_once() == ["sdxl_orchestrator"]
    assert repository.calls == [("unload", "sdxl_orchestrator"), ("load", "sdxl_orchestrator")]
    assert 12 in supervisor.retired  # the survivor exits with the unload; it is not the new stub
    assert set(supervisor.watched) == {"sdxl_vae", "sdxl_orchestrator"}
    assert supervisor.poll_once() == [] and len(repository.calls) == 2  # the census runs once
