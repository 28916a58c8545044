"""Run the tritonserver bundled in the ``nvidia-pytriton`` wheel on our own model repository.

The wheel ships a complete Triton 2.51 server with the Python backend, but laid out for PyTriton's
own use: the backend stub lives apart from the backend, and the binaries only find their libraries
and the right Python through the environment. This module assembles a backend directory, builds
that environment and the command line, and manages the server process (for tests, benchmarks and
``make serve``).

CLI (foreground, logs to stdout)::

    python -m hybridiff.tritonserver --model-repository model_repository
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridiff.supervisor import Supervisor

__all__ = [
    "TritonServer",
    "TritonServerError",
    "find_pytriton_root",
    "free_port",
    "free_ports",
    "main",
    "prepare_backend_dir",
    "server_command",
    "server_env",
]

MiB = 1024 * 1024
# The Python backend's default 1 MiB shared-memory arena is far too small for image tensors; every
# request to a stub then pays for growing it. 16 MiB holds a 1024x1024x3 float32 image.
SHM_DEFAULT_BYTE_SIZE = 16 * MiB
SHM_GROWTH_BYTE_SIZE = 16 * MiB

# Files of the Python backend, relative to the wheel's ``pytriton/tritonserver`` folder.
_BACKEND_FILES = ("backends/python/libtriton_python.so", "backends/python/triton_python_backend_utils.py")
_STUB_NAME = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """The server exited or did not become ready; the message carries the tail of its log."""


def find_pytriton_root() -> Path:
    """Return the wheel's ``pytriton/tritonserver`` folder without importing pytriton (slow, heavy)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed in this environment")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"no tritonserver binary under {root}")
    return root


def _libs_dir(root: Path) -> Path:
    """``nvidia_pytriton.libs`` sits next to the ``pytriton`` package in site-packages."""
    return root.parent.parent / "nvidia_pytriton.libs"


def stub_path(root: Path | None = None, python_version: str | None = None) -> Path:
    """Stub binary built for ``python_version`` (default: the running interpreter's ``3.X``).

    The stub embeds libpython, so it must match the interpreter whose packages the models import.
    """
    root = root or find_pytriton_root()
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    path = root / "python_backend_stubs" / version / _STUB_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the wheel has no Python backend stub for Python {version} ({path})")
    return path


def _place(src: Path, dst: Path, symlink: bool) -> None:
    """Make ``dst`` a symlink to / copy of ``src``; leave it alone if it already is one (idempotent)."""
    if symlink:
        if dst.is_symlink() and Path(os.readlink(dst)) == src:
            return
    elif dst.is_file() and not dst.is_symlink():
        st_src, st_dst = src.stat(), dst.stat()
        if st_src.st_size == st_dst.st_size and int(st_src.st_mtime) == int(st_dst.st_mtime):
            return
    # Build next to the target and rename over it, so a concurrent server never sees a half file.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if symlink:
        tmp.symlink_to(src)
    else:
        shutil.copy2(src, tmp)  # keeps the stub's executable bit and the mtime used above
    os.replace(tmp, dst)


def prepare_backend_dir(dest: Path | str, *, symlink: bool = True, python_version: str | None = None) -> Path:
    """Assemble ``dest/python/`` (backend library, utils module, matching stub); return ``dest``.

    Triton looks for ``<backend-directory>/python/libtriton_python.so`` and the backend starts the
    stub found next to it, so the stub for our Python has to join the backend files. Symlinks are the
    default (verified to work with 2.51: the binaries' ``$ORIGIN`` rpaths are covered by
    ``server_env``); ``symlink=False`` copies instead, e.g. for a directory that outlives the venv.
    Safe to call repeatedly: up-to-date entries are left untouched, stale ones replaced.
    """
    root = find_pytriton_root()
    dest = Path(dest).absolute()
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = [root / rel for rel in _BACKEND_FILES] + [stub_path(root, python_version)]
    for src in sources:
        _place(src.resolve(), python_dir / src.name, symlink)
    return dest


def _venv_bin_dir() -> Path:
    """Directory of the running interpreter (not resolved: a venv's ``bin`` holds symlinks to python)."""
    return Path(sys.executable).absolute().parent


def server_env(base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its Python stubs, based on ``base_env`` (default ``os.environ``).

    * ``LD_LIBRARY_PATH``: the wheel's vendored libraries, then our interpreter's ``LIBDIR`` - the
      stub links ``libpython3.X.so`` and must not pick a system copy of another Python build.
    * ``PATH``: the venv's ``bin`` first, so the stub's embedded Python resolves ``sys.prefix`` to the
      venv and imports its packages (torch, diffusers) without ``PYTHONPATH``; and ``bash`` must be
      reachable, since the backend launches each stub through it.
    """
    env = dict(os.environ if base_env is None else base_env)
    root = find_pytriton_root()

    lib_dirs = [str(_libs_dir(root))]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        lib_dirs.append(str(libdir))
    lib_dirs += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(lib_dirs))  # dedupe, keep order

    venv_bin = str(_venv_bin_dir())
    path_dirs = [venv_bin] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    if shutil.which("bash", path=os.pathsep.join(path_dirs)) is None:
        bash = shutil.which("bash") or shutil.which("bash", path="/usr/bin:/bin")
        if bash is None:
            raise FileNotFoundError("bash not found: the Python backend starts its stubs through bash")
        path_dirs.append(str(Path(bash).parent))
    env["PATH"] = os.pathsep.join(path_dirs)
    return env


def server_command(
    model_repository: Path | str,
    backend_dir: Path | str,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Command line for the bundled tritonserver; ``extra_args`` go last (later flags win).

    ``--exit-on-error`` and ``--strict-readiness`` make a broken model fail fast and keep
    ``/v2/health/ready`` false until every model is loaded - what ``TritonServer.wait_ready`` relies on.
    """
    root = find_pytriton_root()
    return [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={Path(model_repository).absolute()}",
        f"--backend-directory={Path(backend_dir).absolute()}",
        # The wheel has the local response cache; Triton would look under /opt/tritonserver otherwise.
        f"--cache-directory={root / 'caches'}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTE_SIZE}",
        f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTE_SIZE}",
        "--log-verbose=0",
        "--exit-on-error=true",
        "--strict-readiness=true",
        *extra_args,
    ]


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
        from hybridiff.admin import admin_args

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


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launcher dies, so no server outlives it (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_ready(http_url: str, process: subprocess.Popen[bytes], stop: threading.Event) -> bool:
    """Poll ``/v2/health/ready`` until 200; False if the server exits or ``stop`` is set first."""
    while not stop.is_set() and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        stop.wait(0.5)
    return False


def run_supervised(cmd: Sequence[str], env: Mapping[str, str], http_url: str, admin_key: str) -> int:
    """Run tritonserver as a child and supervise its stubs until it exits; return its exit code.

    The launcher stays the parent (not a separate process) because the stubs are tritonserver's
    children: the parent knows the server's pid without searching, dies with it, and is the one
    process that ``make``/Docker/the terminal signals. The server runs in its own session, so a
    terminal's Ctrl-C reaches it once, forwarded from here; SIGTERM and SIGINT are forwarded.
    """
    from hybridiff.supervisor import Supervisor

    process = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True, preexec_fn=_die_with_parent)
    stop = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        stop.set()
        supervisor.request_stop()  # the stubs are about to go; they must not be reloaded
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    supervisor = Supervisor(process.pid, http_url, admin_key)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)

    def supervise() -> None:
        if _wait_ready(http_url, process, stop):
            supervisor.log(f"watching the stubs of tritonserver (pid {process.pid})")
            supervisor.start()

    watcher = threading.Thread(target=supervise, name="hybridiff-wait-ready", daemon=True)
    watcher.start()
    code = process.wait()
    stop.set()
    supervisor.stop()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: prepare the backend dir and the admin key, then run tritonserver in the foreground.

    By default the launcher stays tritonserver's parent and supervises its stubs (``run_supervised``);
    ``--no-supervise`` replaces this process with tritonserver (``exec``), as before.
    """
    from hybridiff.admin import DEFAULT_LISTEN, admin_args, resolve_admin_key

    parser = argparse.ArgumentParser(
        prog="python -m hybridiff.tritonserver",
        description="Run the bundled tritonserver in the foreground on a model repository.",
        epilog="Arguments after '--' are passed to tritonserver unchanged. The admin key is "
        "HYBRIDIFF_ADMIN_KEY if set, else generated; either way it is written to --admin-key-file (0600).",
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help="address for HTTP, gRPC and metrics (default: %(default)s; 0.0.0.0 in a container)",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        default=Path("build/admin-key"),
        help="where the admin key is written, readable by its owner only (default: %(default)s)",
    )
    parser.add_argument(
        "--no-supervise", action="store_true", help="exec tritonserver; nothing brings back a dead stub"
    )
    parser.add_argument(
        "--backend-dir",
        type=Path,
        default=Path("build/triton_backends"),
        help="where to assemble the Python backend + stub (default: %(default)s)",
    )
    parser.add_argument("--copy", action="store_true", help="copy the backend files instead of symlinking")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    if not args.model_repository.is_dir():
        parser.error(f"model repository {args.model_repository} is not a directory")
    try:
        admin_key = resolve_admin_key(args.admin_key_file)
    except ValueError as err:
        parser.error(str(err))
    backend_dir = prepare_backend_dir(args.backend_dir, symlink=not args.copy)
    cmd = server_command(
        args.model_repository,
        backend_dir,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        [*admin_args(admin_key, args.listen), *extra],
    )
    print("+ " + " ".join(cmd).replace(admin_key, "<admin-key>"), flush=True)
    print(f"admin key in {args.admin_key_file} (send it as header 'admin-key')", flush=True)
    sys.stderr.flush()
    if args.no_supervise:
        os.execve(cmd[0], cmd, server_env())
        return 0  # not reached
    host = "127.0.0.1" if args.listen in ("0.0.0.0", "::", "") else args.listen
    host = f"[{host}]" if ":" in host else host
    return run_supervised(cmd, server_env(), f"{host}:{args.http_port}", admin_key)


if __name__ == "__main__":
    sys.exit(main())
