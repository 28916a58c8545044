"""Run the tritonserver bundled in the ``nvidia-pytriton`` wheel on our own model repository.

The wheel ships a complete Triton 2.51 server with the Python backend, but laid out for PyTriton's
own use: the backend stub lives apart from the backend, and the binaries only find their libraries
and the right Python through the environment. This module assembles a backend directory, builds
that environment and the command line, and runs the server in the foreground (``make serve``) with
the admin APIs behind a key, on 127.0.0.1 by default, and a supervisor that brings back dead stubs
(:mod:`hybridiff.admin`, :mod:`hybridiff.supervisor`).
Managing a server as a child process (tests, benchmark, load test) is tooling: ``tools.triton_process``.

CLI (foreground, logs to stdout)::

    python -m hybridiff.tritonserver --model-repository model_repository
    python -m hybridiff.tritonserver --model-repository model_repository --dry-run   # print, do not run
    python -m hybridiff.tritonserver --model-repository /models --server-root /opt/tritonserver  # container

``--server-root`` takes the server binary and the Python backend library from an installed Triton of
the same release (the official container's ``/opt/tritonserver``); the stub still comes from the wheel,
since it must match the interpreter whose packages the models import.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "find_pytriton_root",
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


def prepare_backend_dir(
    dest: Path | str,
    *,
    symlink: bool = True,
    python_version: str | None = None,
    server_root: Path | str | None = None,
) -> Path:
    """Assemble ``dest/python/`` (backend library, utils module, matching stub); return ``dest``.

    Triton looks for ``<backend-directory>/python/libtriton_python.so`` and the backend starts the
    stub found next to it, so the stub for our Python has to join the backend files. Symlinks are the
    default (verified to work with 2.51: the binaries' ``$ORIGIN`` rpaths are covered by
    ``server_env``); ``symlink=False`` copies instead, e.g. for a directory that outlives the venv.
    Safe to call repeatedly: up-to-date entries are left untouched, stale ones replaced.
    With ``server_root``, the backend library and utils come from that server's ``backends/python``.
    """
    root = find_pytriton_root()
    dest = Path(dest).absolute()
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    backend_root = Path(server_root) if server_root is not None else root
    sources = [backend_root / rel for rel in _BACKEND_FILES] + [stub_path(root, python_version)]
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
    server_root: Path | str | None = None,
) -> list[str]:
    """Command line for the bundled tritonserver (or the one in ``server_root``); ``extra_args`` go
    last (later flags win).

    ``--exit-on-error`` and ``--strict-readiness`` make a broken model fail fast and keep
    ``/v2/health/ready`` false until every model is loaded - what ``TritonServer.wait_ready`` relies on.
    """
    root = Path(server_root) if server_root is not None else find_pytriton_root()
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: prepare the backend dir and the admin key, then run tritonserver in the foreground.

    By default the launcher stays tritonserver's parent and supervises its stubs
    (:func:`hybridiff.supervisor.run_supervised`); ``--no-supervise`` replaces this process with
    tritonserver (``exec``).
    """
    from hybridiff.admin import DEFAULT_LISTEN, admin_args, resolve_admin_key
    from hybridiff.supervisor import run_supervised

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
    parser.add_argument(
        "--server-root",
        type=Path,
        default=None,
        help="an installed Triton of the same release (e.g. /opt/tritonserver in the official container) "
        "whose binary and Python backend to run instead of the wheel's",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the command and the environment variables it changes as JSON, and exit",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    if not args.model_repository.is_dir():
        parser.error(f"model repository {args.model_repository} is not a directory")
    if args.server_root is not None and not (args.server_root / "bin" / "tritonserver").is_file():
        parser.error(f"--server-root {args.server_root} has no bin/tritonserver")
    masked = "<admin-key-hidden>"
    if args.dry_run:
        admin_key = masked  # a dry run writes nothing, the key file included
    else:
        try:
            admin_key = resolve_admin_key(args.admin_key_file)
        except ValueError as err:
            parser.error(str(err))
    backend_dir = args.backend_dir.absolute()
    if not args.dry_run:
        prepare_backend_dir(backend_dir, symlink=not args.copy, server_root=args.server_root)
    cmd = server_command(
        args.model_repository,
        backend_dir,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        [*admin_args(admin_key, args.listen), *extra],
        server_root=args.server_root,
    )
    env = server_env()
    if args.dry_run:
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        print(json.dumps({"command": cmd, "env": changed, "supervised": not args.no_supervise}, indent=2))
        return 0
    print("+ " + " ".join(cmd).replace(admin_key, masked), flush=True)
    print(f"admin key in {args.admin_key_file} (send it as header 'admin-key')", flush=True)
    sys.stderr.flush()
    if args.no_supervise:
        os.execve(cmd[0], cmd, env)
        return 0  # not reached
    host = "127.0.0.1" if args.listen in ("0.0.0.0", "::", "") else args.listen
    host = f"[{host}]" if ":" in host else host
    return run_supervised(cmd, env, f"{host}:{args.http_port}", admin_key)


if __name__ == "__main__":
    sys.exit(main())
