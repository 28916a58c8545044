"""``make serve``'s own path: ``python -m hybridiff.tritonserver`` as a process, supervising tritonserver,
bringing a killed stub back, and taking the server down with it on SIGTERM."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from export.make_repository import Deployment, write_repository
from hybridiff.params import Limits
from hybridiff.readiness import http_ready, not_ready, repository_models
from hybridiff.supervisor import scan_stubs
from tests.helpers import wait_for
from tools.triton_process import free_ports

pytestmark = pytest.mark.server

REPO_ROOT = Path(__file__).resolve().parents[1]



def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_launcher_supervises_and_stops_with_the_server(sdxl_tiny, tmp_path):
    repo = tmp_path / "model_repository"
    write_repository(repo, {"sdxl": Path(sdxl_tiny)},
                     Deployment(devices=2, kind="cpu", orchestrator_instances=1, limits=Limits(max_height=128)))
    http_port, grpc_port, metrics_port = free_ports(3)
    key_file = tmp_path / "secret" / "admin-key"
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'python_backend'}{os.pathsep}{REPO_ROOT}"}
    env.pop("HYBRIDIFF_ADMIN_KEY", None)
    log = open(tmp_path / "launcher.log", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hybridiff.tritonserver", "--model-repository", str(repo),
         "--backend-dir", str(tmp_path / "backends"), "--admin-key-file", str(key_file),
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"127.0.0.1:{http_port}"
    models = repository_models(repo)
    server_pid = None
    try:
        assert wait_for(lambda: launcher.poll() is None and not_ready(models, http_ready(url)) == [], 300, 1.0)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_text().strip()) >= 32
        assert key_file.read_text().strip() not in (tmp_path / "launcher.log").read_text()
        [server_pid] = children(launcher.pid)  # tritonserver is the launcher's child
        assert os.getsid(server_pid) == server_pid  # in its own session: Ctrl-C reaches it once, forwarded

        # The first scan also compares the live stubs with the configured instances (a stub dead before it
        # would otherwise go unnoticed): every model of the repository is counted, none is short.
        assert wait_for(lambda: "[supervisor] census:" in (tmp_path / "launcher.log").read_text(), 60, 0.1)
        census = next(line for line in (tmp_path / "launcher.log").read_text().splitlines() if "census:" in line)
        python_models = [m for m in models if 'backend: "python"' in (repo / m / "config.pbtxt").read_text()]
        assert f"{len(python_models)} Python models" in census and "short of stubs: none" in census, census
        [victim] = [s.pid for s in scan_stubs(server_pid).values() if s.model == "sdxl_vae"]
        os.kill(victim, signal.SIGKILL)
        # The supervisor takes the model down (readiness says so) and brings it back; on a busy machine the
        # whole cycle may pass between two polls, so its own log line counts as having seen it.
        log_text = lambda: (tmp_path / "launcher.log").read_text()  # noqa: E731
        assert wait_for(lambda: "sdxl_vae" in not_ready(models, http_ready(url)) or "sdxl_vae: loaded again"
                        in log_text(), 60, 0.1)
        assert wait_for(lambda: not_ready(models, http_ready(url)) == [], 120, 0.5)
        assert "sdxl_vae: loaded again" in (tmp_path / "launcher.log").read_text()

        stubs = list(scan_stubs(server_pid))
        launcher.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert launcher.wait(60) == 0
        assert wait_for(lambda: not Path(f"/proc/{server_pid}").exists() and
                        not any(Path(f"/proc/{pid}").exists() for pid in stubs), 30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        if server_pid is not None:
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        print((tmp_path / "launcher.log").read_text()[-4000:])
