"""The repository generator: N devices, CPU or GPU, reproducible, and the committed copy is current."""

import filecmp
import re
from pathlib import Path

import pytest

from export.make_repository import Deployment, main, write_repository
from hybridiff.params import Limits

REPO = Path(__file__).resolve().parents[1]


def read(repo: Path, model: str, name: str = "config.pbtxt") -> str:
    return (repo / model / name).read_text()


@pytest.mark.parametrize("devices", [1, 2, 3])
def test_one_denoiser_model_per_device(tmp_path, devices):
    repo = write_repository(tmp_path / "r", {"sdxl": tmp_path / "ckpt"}, Deployment(devices=devices))
    denoisers = sorted(p.name for p in repo.iterdir() if "denoiser" in p.name)
    assert denoisers == [f"sdxl_denoiser_{i}" for i in range(devices)]
    assert f'key: "denoisers" value: {{ string_value: "{",".join(denoisers)}" }}' in read(repo, "sdxl_orchestrator")
    for name in denoisers:
        config = read(repo, name)
        assert "kind: KIND_CPU" in config and 'key: "cpu_cores"' in config
        assert "TYPE_FP32" in config and "TYPE_FP16" not in config
        assert "hybridiff.triton.denoiser import TritonPythonModel" in read(repo, name, "1/model.py")


def test_gpu_deployment_pins_each_denoiser_to_its_gpu_in_fp16(tmp_path):
    repo = write_repository(tmp_path / "r", {"sdxl": tmp_path / "ckpt"}, Deployment(devices=2, kind="gpu"))
    for i in range(2):
        config = read(repo, f"sdxl_denoiser_{i}")
        assert f"kind: KIND_GPU gpus: [ {i} ]" in config
        assert 'name: "EPS" data_type: TYPE_FP16' in config
        assert 'name: "SAMPLE" data_type: TYPE_FP32' in config  # latents stay fp32 for the scheduler
    for model in ("sdxl", "sdxl_orchestrator"):
        assert "kind: KIND_CPU" in read(repo, model)  # BLS logic needs no GPU of its own
    assert 'key: "bls_memory" value: { string_value: "gpu" }' in read(repo, "sdxl_orchestrator")


def test_the_public_model_is_a_front_handing_requests_to_the_bls_orchestrator(tmp_path):
    repo = write_repository(tmp_path / "r", {"sdxl": tmp_path / "ckpt"}, Deployment(orchestrator_instances=3))
    public, orchestrator = read(repo, "sdxl"), read(repo, "sdxl_orchestrator")
    assert 'backend: "python"' in public and "ensemble" not in public
    assert "hybridiff.triton.front import TritonPythonModel" in read(repo, "sdxl", "1/model.py")
    # What it needs to price a request on arrival: the checkpoint's defaults, the limits, the slots and devices.
    front = _parameters(public)
    assert (front["family"], front["orchestrator"], front["checkpoint"]) == ("sdxl", "sdxl_orchestrator", "../ckpt")
    assert (front["orchestrator_instances"], front["devices"], front["admit_by_deadline"]) == ("3", "2", "1")
    assert "hybridiff.triton.orchestrator import TritonPythonModel" in read(repo, "sdxl_orchestrator", "1/model.py")
    params = _parameters(orchestrator)
    assert (params["text_encoder"], params["vae"]) == ("sdxl_text_encoder", "sdxl_vae")
    for config in (public, orchestrator):
        assert 'name: "NEGATIVE_PROMPT" data_type: TYPE_STRING dims: [ -1 ] optional: true' in config
        assert 'name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ]' in config
    assert "instance_group [ { count: 3 kind: KIND_CPU } ]" in orchestrator  # one per request running
    # One per request it may hold (queue_size 4 more than run) and 4 spare, to refuse the excess at once.
    assert "instance_group [ { count: 11 kind: KIND_CPU } ]" in public
    # The key the front marks a cancel under is internal: the orchestrator takes it, the public model does not.
    assert 'name: "REQUEST_KEY" data_type: TYPE_STRING dims: [ 1 ] optional: true' in orchestrator
    assert "REQUEST_KEY" not in public
    assert 'string_value: "../ckpt"' in read(repo, "sdxl_vae")  # relative: repository and checkpoint move together


def _parameters(config: str) -> dict[str, str]:
    """The ``parameters`` of a generated config.pbtxt (one ``{ key: .. value: { string_value: .. } }`` a line)."""
    found = re.findall(r'\{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}', config)
    return dict(found)


def test_every_internal_model_gets_the_deployment_limits(tmp_path):
    """Each internal model checks its inputs against the public limits, so each needs them (hybridiff.validation)."""
    limits = Limits(max_height=512, max_width=768, min_size=128, max_steps=30, max_batch=3)
    deployment = Deployment(devices=2, max_device_batch=6, limits=limits)
    repo = write_repository(tmp_path / "r", {"sdxl": tmp_path / "ckpt"}, deployment)
    models = ["sdxl_text_encoder", "sdxl_denoiser_0", "sdxl_denoiser_1", "sdxl_vae", "sdxl_orchestrator"]
    for model in models:
        params = _parameters(read(repo, model))
        assert Limits.from_parameters(params) == limits, model
    for i in range(2):
        config = read(repo, f"sdxl_denoiser_{i}")
        assert _parameters(config)["max_device_batch"] == "6" and "max_batch_size: 6" in config


def test_generation_is_reproducible(tmp_path):
    args = ["--model", f"sdxl={tmp_path / 'ckpt'}", "--devices", "2"]
    main(["--out", str(tmp_path / "a"), *args])
    main(["--out", str(tmp_path / "b"), *args])
    comparison = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for sub in comparison.subdirs.values():
        assert not sub.diff_files and not sub.left_only and not sub.right_only


def test_sd3_alone_or_beside_sdxl_gets_its_own_models_and_wire_tensors(tmp_path):
    sd3_only = write_repository(tmp_path / "a", {"sd3": tmp_path / "sd3"}, Deployment())
    sd3_models = ["sd3", "sd3_denoiser_0", "sd3_denoiser_1", "sd3_orchestrator", "sd3_text_encoder", "sd3_vae"]
    assert sorted(p.name for p in sd3_only.iterdir()) == sd3_models
    assert 'name: "cond_POOLED_EMBEDS"' in read(sd3_only, "sd3_text_encoder")
    denoiser = read(sd3_only, "sd3_denoiser_0")
    assert 'name: "MIDDLE_HIDDEN"' in denoiser and 'name: "MIDDLE_ENCODER"' in denoiser
    assert "TIME_IDS" not in denoiser and "HEAD_ACT" not in denoiser
    assert 'key: "family" value: { string_value: "sd3" }' in read(sd3_only, "sd3_orchestrator")
    both = write_repository(tmp_path / "b", {"sdxl": tmp_path / "sdxl", "sd3": tmp_path / "sd3"}, Deployment())
    names = sorted(p.name for p in both.iterdir())
    assert [n for n in names if n.startswith("sd3")] == sd3_models and len(names) == 2 * len(sd3_models)
    for name in sd3_models:
        assert read(both, name) == read(sd3_only, name)  # one family's models do not depend on the other


def test_committed_repository_is_what_make_repository_writes(tmp_path):
    """model_repository/ in git is `make repository` output (the built-in models: the trained SDXL and SD3 shape
    models, side by side on 2 CPU devices)."""
    out = tmp_path / "model_repository"
    write_repository(out, {"sdxl": tmp_path / "models" / "sdxl-shapes", "sd3": tmp_path / "models" / "sd3-shapes"},
                     Deployment(devices=2))
    for path in sorted(out.rglob("*")):
        if path.is_file():
            committed = REPO / "model_repository" / path.relative_to(out)
            assert committed.exists(), f"{committed} missing: run `make repository`"
            assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make repository`"


def test_model_py_serves_the_hybridiff_on_pythonpath_although_the_stub_runs_isolated(tmp_path):
    """The stub's interpreter ignores PYTHONPATH (isolated config, like ``python -I``); model.py honours it."""
    import os
    import subprocess
    import sys

    repo = write_repository(tmp_path / "r", {"sdxl": tmp_path / "ckpt"}, Deployment(devices=1))
    fake = tmp_path / "checkout" / "hybridiff" / "triton"
    fake.mkdir(parents=True)
    for folder in (fake.parent, fake):
        (folder / "__init__.py").write_text("")
    (fake / "denoiser.py").write_text("TritonPythonModel = 'from the checkout'\n")
    model_py = repo / "sdxl_denoiser_0" / "1" / "model.py"
    code = f"exec(open({str(model_py)!r}).read()); print(TritonPythonModel)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "checkout")}
    done = subprocess.run([sys.executable, "-I", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "from the checkout", done.stderr
