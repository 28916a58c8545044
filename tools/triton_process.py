"""The bundled tritonserver as a managed child process, for tests, the benchmark and the load test.

Tooling, not serving: ``make serve`` runs :mod:`hybridiff.tritonserver` in the foreground, and this
module only reuses its backend directory, environment and command line. What it adds is what a test
needs: free ports, a readiness wait that fails with the server's log, and a stop that leaves no stub
or shared-memory region behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from hybridiff.admin import admin_args
from hybridiff.tritonserver import prepare_backend_dir, server_command, server_env

if TYPE_CHECKING:
    from hybridiff.supervisor import Supervisor

__all__ = ["TritonServer", "TritonServerError", "free_port", "free_ports", "server_unless_given"]


class TritonServerError(RuntimeError):
    """The server exited or did not become ready; the message carries the tail of its log."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that are free right now (all sockets held open until all are picked).

    Another process may still grab one before the server binds it; tests accept that small race.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One currently free TCP port (see ``free_ports`` for several distinct ones)."""
    return free_ports(1, host)[0]


def _tail(path: Path, max_lines: int = 60) -> str:
    """Last lines of a log file, for error messages."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return "\n".join(lines[-max_lines:])


_SHM_PREFIX = "triton_python_backend_shm_region_"


def _group_shm_regions(pgid: int) -> list[str]:
    """Shared-memory regions named on the command lines of the stubs in process group ``pgid``.

    Each stub gets its region's name as an argument; a SIGKILLed server never unlinks them, so they
    would pile up in /dev/shm (64 MiB by default in Docker). Linux-only, best effort.
    """
    regions = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            # Field 5 (pgrp) follows the ")" that closes the command name, which may contain spaces.
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        regions += [a.decode() for a in argv if a.startswith(_SHM_PREFIX.encode())]
    return regions


class TritonServer:
    """The bundled tritonserver as a managed child process.

    Ports left as ``None`` are chosen free at construction, so parallel tests do not clash. The server
    runs in its own process group: its Python stubs are its children, and ``stop`` signals the whole
    group so nothing survives. As a context manager it starts, waits until ready, and always stops;
    ``close`` also removes the temp dir holding the default backend dir and log.

    It starts as ``make serve`` does (``hybridiff.admin.admin_args``): on 127.0.0.1, explicit model
    control, the admin APIs behind ``admin_key`` (random unless given). ``supervise=True`` also runs a
    ``Supervisor`` thread from ready until stop, which reloads a model whose stub dies.

    ``exit_timeout`` (``--exit-timeout-secs``) bounds Triton's graceful shutdown, which otherwise waits
    up to 30 s for every open HTTP connection - including an idle keep-alive one of a client that was
    never closed.

    >>> with TritonServer("model_repository") as server:      # doctest: +SKIP
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        backend_dir: Path | str | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_file: Path | str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 120.0,
        exit_timeout: int = 10,
        symlink: bool = True,
        admin_key: str | None = None,
        supervise: bool = False,
    ) -> None:
        self.model_repository = Path(model_repository).absolute()
        self._tmpdir: Path | None = None
        self.backend_dir = Path(backend_dir) if backend_dir is not None else self._scratch() / "backends"
        # Kept after stop (until close) so a failing test can still show it.
        self.log_file = Path(log_file) if log_file is not None else self._scratch() / "tritonserver.log"
        picked = iter(free_ports(sum(p is None for p in (http_port, grpc_port, metrics_port))))
        self.http_port = http_port if http_port is not None else next(picked)
        self.grpc_port = grpc_port if grpc_port is not None else next(picked)
        self.metrics_port = metrics_port if metrics_port is not None else next(picked)
        self.admin_key = admin_key if admin_key is not None else secrets.token_urlsafe(32)
        self.extra_args = (f"--exit-timeout-secs={exit_timeout}", *admin_args(self.admin_key), *extra_args)
        self.supervise = supervise
        self.supervisor: Supervisor | None = None
        self.env = env
        self.ready_timeout = ready_timeout
        self.exit_timeout = exit_timeout
        self.symlink = symlink
        self.process: subprocess.Popen[bytes] | None = None

    def _scratch(self) -> Path:
        """Temp dir for the defaults of ``backend_dir`` and ``log_file``, created on first use."""
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        return self._tmpdir

    # 127.0.0.1 rather than localhost: Triton listens on IPv4 and "localhost" may try ::1 first.
    @property
    def http_url(self) -> str:
        """``host:port`` as ``tritonclient.http`` expects it (no scheme)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc``."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        """The exact command ``start`` runs."""
        return server_command(
            self.model_repository,
            self.backend_dir,
            self.http_port,
            self.grpc_port,
            self.metrics_port,
            self.extra_args,
        )

    def start(self) -> TritonServer:
        """Launch the server (does not wait for readiness; see ``wait_ready``)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("server already running")
        prepare_backend_dir(self.backend_dir, symlink=self.symlink)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(self.env),
                start_new_session=True,  # own process group: stop() reaches the stubs too
            )
        return self

    def logs(self) -> str:
        """Whole server log so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def is_ready(self) -> bool:
        """One probe of ``GET /v2/health/ready`` (200 only once every model is loaded)."""
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):  # HTTPError (400) included
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll readiness for up to ``timeout`` s (default ``ready_timeout``); raise ``TritonServerError``
        with the log tail if the server exits first (a model failed to load) or never gets ready."""
        if self.process is None:
            raise RuntimeError("server not started")
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} before becoming ready; log {self.log_file}:\n"
                    f"{_tail(self.log_file)}"
                )
            if self.is_ready():
                if self.supervise and self.supervisor is None:
                    from hybridiff.supervisor import Supervisor

                    self.supervisor = Supervisor(self.process.pid, self.http_url, self.admin_key).start()
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout} s; log {self.log_file}:\n{_tail(self.log_file)}"
                )
            time.sleep(0.1)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)  # pgid == pid thanks to start_new_session

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the process group (graceful: Triton drains, unloads models and ends its stubs, which
        ignore the signal themselves), wait ``timeout`` s (default ``exit_timeout`` + 10), then SIGKILL
        the group and unlink the stubs' shared memory. Returns the server's exit code. Idempotent."""
        if self.supervisor is not None:  # first, or it would see the stubs go and reload them
            self.supervisor.request_stop()
            self.supervisor.stop()
            self.supervisor = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(self.exit_timeout + 10 if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                pass
        # Also covers stubs left behind by a server that crashed or did not stop in time.
        regions = _group_shm_regions(self.process.pid)
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        for region in regions:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{region}")
        return self.process.returncode

    def close(self) -> None:
        """Stop the server and drop the temp dir (with the log, if it was ours)."""
        self.stop()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def server_unless_given(repository: str | Path, url: str | None, **kwargs) -> Iterator[TritonServer | None]:
    """A started server on ``repository`` for the duration, or None when the caller names a running
    one (``url``): the benchmark and the load tests accept either."""
    if url is not None:
        yield None
        return
    with TritonServer(repository, **kwargs) as server:
        yield server
