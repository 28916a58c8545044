"""`make gpu-check` on this CPU machine (CUDA parts reported as skipped, the in-process checks run on
CPU instead) and the pieces of the GPU tooling that need no GPU: sharing GPU 0, the thresholds, and
trimming the nvidia-pytriton wheel for the GPU machine's Python."""

from __future__ import annotations

import os
import stat
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tools import gpu_check, gpu_wheels

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, make gpu-check runs the real GPU check")
def test_make_gpu_check_runs_here_and_says_what_it_skipped(tmp_path) -> None:
    out = tmp_path / "gpu-check.md"
    done = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--out {out}"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    assert "6 passed, 0 failed, 2 skipped" in report
    skipped = [line for line in report.splitlines() if "| SKIPPED |" in line]
    assert len(skipped) == 2 and all("no CUDA device" in line for line in skipped)
    assert any(line.startswith("| (a) CUDA fp16") for line in skipped)
    assert any(line.startswith("| (b) server, KIND_GPU") for line in skipped)
    for family in ("sdxl", "sd3"):
        for check in ("serial = diffusers pipeline", "cfg_parallel = serial", "stage split = whole model"):
            assert f"| CPU fp32 stand-in (tiny) | {family} {check} | PASS |" in report, (family, check)
    assert "- CUDA available: False" in report and "- commit: " in report


def test_share_gpu0_moves_every_model_to_the_one_gpu(sdxl_tiny, tmp_path) -> None:
    from export.make_repository import Deployment, write_repository

    repo = write_repository(tmp_path / "repo", {"sdxl": sdxl_tiny}, Deployment(devices=2, kind="gpu"))
    assert "gpus: [ 1 ]" in (repo / "sdxl_denoiser_1" / "config.pbtxt").read_text()
    assert gpu_check.share_gpu0(repo) >= 2  # denoiser 1 and the VAE (on the last device)
    configs = [p.read_text() for p in repo.glob("*/config.pbtxt")]
    assert not any("gpus: [ 1 ]" in text for text in configs)
    assert sum("KIND_GPU gpus: [ 0 ]" in text for text in configs) >= 4
    assert gpu_check.share_gpu0(repo) == 0


def test_image_thresholds() -> None:
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 2
    assert gpu_check.images_agree(a, a, fp16=False)[0]
    assert not gpu_check.images_agree(a, b, fp16=False)[0]  # fp32: 1 level at most
    assert gpu_check.images_agree(a, b, fp16=True)[0]  # one pixel off by 2: far above 35 dB
    assert not gpu_check.images_agree(a, np.full_like(a, 40), fp16=True)[0]


def _fake_pytriton_wheel(path: Path) -> list[str]:
    names = [
        "pytriton/__init__.py",
        "pytriton/tritonserver/bin/tritonserver",
        *[f"pytriton/tritonserver/python_backend_stubs/{v}/triton_python_backend_stub"
          for v in ("3.11", "3.12", "3.13")],
        "nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0",
        "nvidia_pytriton.libs/libtritonserver-717102f0.so",
    ]
    with zipfile.ZipFile(path, "w") as wheel:
        for name in names:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o755) << 16
            wheel.writestr(info, name * 100)
        record = "".join(f"{name},sha256=x,1\n" for name in names) + "nvidia_pytriton-0.7.0.dist-info/RECORD,,\n"
        wheel.writestr("nvidia_pytriton-0.7.0.dist-info/RECORD", record)
    return names


def test_trim_keeps_only_the_stub_of_the_target_python(tmp_path) -> None:
    wheel = tmp_path / "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl"
    _fake_pytriton_wheel(wheel)
    assert gpu_wheels.trim_pytriton(wheel, "3.12") > 0
    with zipfile.ZipFile(wheel) as trimmed:
        kept = set(trimmed.namelist())
        record = trimmed.read("nvidia_pytriton-0.7.0.dist-info/RECORD").decode()
        stub = trimmed.getinfo("pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub")
    stubs = {n for n in kept if "python_backend_stubs" in n}
    assert stubs == {"pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"}
    assert "nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0" not in kept  # only the 3.13 stub needs it
    assert {"pytriton/tritonserver/bin/tritonserver", "nvidia_pytriton.libs/libtritonserver-717102f0.so"} <= kept
    assert "3.13" not in record and "3.11" not in record and "3.12/triton_python_backend_stub" in record
    assert (stub.external_attr >> 16) & 0o111  # still executable once installed
    assert gpu_wheels.trim_pytriton(wheel, "3.12") == 0  # nothing left to drop


def test_trim_for_python_3_13_keeps_its_libpython(tmp_path) -> None:
    wheel = tmp_path / "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl"
    _fake_pytriton_wheel(wheel)
    gpu_wheels.trim_pytriton(wheel, "3.13")
    with zipfile.ZipFile(wheel) as trimmed:
        assert "nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0" in trimmed.namelist()


def test_wheel_pins_follow_requirements() -> None:
    pins = dict(pin.split("==") for pin in gpu_wheels.pins())
    requirements = (REPO / "requirements.txt").read_text()
    for name in ("diffusers", "tritonclient", "nvidia-pytriton"):
        assert f"{name}=={pins[name]}" in requirements.replace("tritonclient[all]", "tritonclient")
    assert set(gpu_wheels.MISSING_ON_GPU) <= set(pins)
    assert os.path.basename(str(gpu_wheels.REPO)) == REPO.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="exercises the CPU branch")
def test_a_part_that_breaks_is_a_failure_with_its_details(tmp_path, monkeypatch) -> None:
    def broken(family, setup, part):
        raise RuntimeError(f"{family} could not load")

    monkeypatch.setattr(gpu_check, "in_process", broken)
    out = tmp_path / "report.md"
    assert gpu_check.main(["--out", str(out)]) == 1
    report = out.read_text()
    assert "0 passed, 2 failed, 2 skipped" in report
    assert "| CPU fp32 stand-in (tiny) | sd3: load | FAIL | RuntimeError: sd3 could not load |" in report
    assert "## Failure details" in report and "Traceback" in report
