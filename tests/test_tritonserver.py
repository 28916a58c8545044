"""Tests for the launcher hybridiff.tritonserver: environment, backend-dir and command-line assembly (no server).
The managed server process and a real round trip are in test_triton_process.py."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from hybridiff.tritonserver import find_pytriton_root, prepare_backend_dir, server_command, server_env

PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_server_env_library_and_path_order() -> None:
    base = {"LD_LIBRARY_PATH": "/opt/existing/lib", "PATH": "/opt/somewhere/bin", "KEEP": "1"}
    env = server_env(base)

    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0] == str(find_pytriton_root().parent.parent / "nvidia_pytriton.libs")
    assert Path(libs[0]).is_dir()
    assert libs[1] == sysconfig.get_config_var("LIBDIR")
    assert libs[-1] == "/opt/existing/lib"

    path = env["PATH"].split(os.pathsep)
    assert path[0] == str(Path(sys.executable).absolute().parent)
    assert "/opt/somewhere/bin" in path
    assert shutil.which("bash", path=env["PATH"]) is not None  # added although base PATH lacks it
    assert env["KEEP"] == "1"
    assert base["PATH"] == "/opt/somewhere/bin"  # input not mutated


def test_server_env_without_existing_vars() -> None:
    env = server_env({})
    assert len(env["LD_LIBRARY_PATH"].split(os.pathsep)) == 2
    assert shutil.which("bash", path=env["PATH"]) is not None


@pytest.mark.parametrize("symlink", [True, False])
def test_prepare_backend_dir_is_idempotent(tmp_path: Path, symlink: bool) -> None:
    root = find_pytriton_root()
    dest = prepare_backend_dir(tmp_path / "backends", symlink=symlink)
    python_dir = dest / "python"
    names = {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert {p.name for p in python_dir.iterdir()} == names

    stub = python_dir / "triton_python_backend_stub"
    expected_stub = root / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub"
    assert stub.read_bytes() == expected_stub.read_bytes()  # the stub for the running Python
    assert os.access(stub, os.X_OK)
    assert all((python_dir / n).is_symlink() == symlink for n in names)

    inodes = {n: (python_dir / n).lstat().st_ino for n in names}
    assert prepare_backend_dir(dest, symlink=symlink) == dest
    assert {n: (python_dir / n).lstat().st_ino for n in names} == inodes  # untouched the second time

    # Switching mode (or a stale entry) replaces the files in place.
    prepare_backend_dir(dest, symlink=not symlink)
    assert all((python_dir / n).is_symlink() == (not symlink) for n in names)
    assert stub.read_bytes() == expected_stub.read_bytes()


def test_server_command_flags(tmp_path: Path) -> None:
    cmd = server_command(tmp_path / "repo", tmp_path / "be", 1, 2, 3, extra_args=["--log-verbose=1"])
    assert Path(cmd[0]).name == "tritonserver" and os.access(cmd[0], os.X_OK)
    for flag in (
        f"--model-repository={tmp_path / 'repo'}",
        f"--backend-directory={tmp_path / 'be'}",
        "--http-port=1",
        "--grpc-port=2",
        "--metrics-port=3",
        "--exit-on-error=true",
        "--strict-readiness=true",
    ):
        assert flag in cmd
    assert any(a.startswith("--backend-config=python,shm-default-byte-size=") for a in cmd)
    assert any(a.startswith("--backend-config=python,shm-growth-byte-size=") for a in cmd)
    assert cmd[-1] == "--log-verbose=1"  # extra args last, so they override
