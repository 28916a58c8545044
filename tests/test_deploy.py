"""What can be checked of the deployment without Docker, a cluster or a GPU: the container entrypoint
passes the launcher what `make serve` passes, the Dockerfile installs what the server needs at build
time and starts that entrypoint, and the Kubernetes manifests are valid against the real Kubernetes
schemas (strict: unknown fields are errors) and agree with each other and with the code."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploy import entrypoint
from hybridiff import probe

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "deploy" / "kubernetes"
# Oldest and newest Kubernetes minors checked; both must accept every manifest.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def _run(command: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(entrypoint.PREFIX)}
    env["PYTHONPATH"] = f"{REPO / 'python_backend'}{os.pathsep}{REPO}"
    return {**env, **extra}


def make_serve_launcher_args() -> list[str]:
    """The launcher arguments of `make serve`'s recipe, as make would run them (repository not rebuilt)."""
    lines = _run(["make", "-s", "-n", "-o", "repository", "serve"]).replace("\\\n", " ").splitlines()
    (line,) = [line for line in lines if "-m hybridiff.tritonserver" in line]
    words = shlex.split(line)
    return words[words.index("hybridiff.tritonserver") + 1:]


def _normalized(command: list[str]) -> list[str]:
    """The command with the two deployment-specific paths replaced by placeholders."""
    return [re.sub(r"^(--model-repository|--backend-directory)=.*", r"\1=<path>", word) for word in command]


# --- the entrypoint ---------------------------------------------------------------------------------


def test_entrypoint_runs_the_launcher_with_the_flags_of_make_serve(sdxl_tiny, sd3_tiny, tmp_path) -> None:
    serve = json.loads(_run([sys.executable, "-m", "hybridiff.tritonserver", *make_serve_launcher_args(),
                             "--dry-run"], _env()))
    repo = tmp_path / "repo"
    # Listening on 127.0.0.1 as make serve does (a container's default is every interface, tested below).
    env = _env(HYBRIDIFF_MODELS=f"sdxl={sdxl_tiny},sd3={sd3_tiny}", HYBRIDIFF_KIND="cpu",
               HYBRIDIFF_REPOSITORY=str(repo), HYBRIDIFF_BACKEND_DIR=str(tmp_path / "be"),
               HYBRIDIFF_LISTEN_ADDRESS="127.0.0.1")
    out = _run([sys.executable, "-m", "deploy.entrypoint", "--dry-run"], env)
    container = json.loads(out[out.index("{"):])  # after make_repository's "wrote ..." line

    assert _normalized(container["command"]) == _normalized(serve["command"])
    assert f"--model-repository={repo}" in container["command"]
    assert f"--backend-directory={tmp_path / 'be'}" in container["command"]
    assert container["env"] == serve["env"]
    assert container["supervised"] and serve["supervised"]
    # ... and it wrote the repository it points the server at.
    names = {p.name for p in repo.iterdir()}
    assert {"sdxl", "sd3", "sdxl_denoiser_0", "sdxl_denoiser_1", "sd3_text_encoder", "sd3_vae"} <= names
    assert "KIND_CPU" in (repo / "sdxl_denoiser_1" / "config.pbtxt").read_text()


def test_entrypoint_in_the_container_uses_the_server_root_and_listen_address(sdxl_tiny, tmp_path, capsys) -> None:
    root = tmp_path / "tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_text("")
    env = {"HYBRIDIFF_MODELS": f"sdxl={sdxl_tiny}", "HYBRIDIFF_DEVICES": "2", "HYBRIDIFF_SERVER_ROOT": str(root),
           "HYBRIDIFF_REPOSITORY": str(tmp_path / "repo"), "HYBRIDIFF_BACKEND_DIR": str(tmp_path / "be"),
           "HYBRIDIFF_LISTEN_ADDRESS": "0.0.0.0", "HYBRIDIFF_HTTP_PORT": "9000", "HYBRIDIFF_MAX_STEPS": "50"}
    assert entrypoint.main(["--dry-run"], env) == 0
    out = capsys.readouterr().out
    command = json.loads(out[out.index("{"):])["command"]
    assert command[0] == str(root / "bin" / "tritonserver")
    assert f"--cache-directory={root / 'caches'}" in command
    assert "--http-port=9000" in command
    for endpoint in ("http", "grpc", "metrics"):
        assert f"--{endpoint}-address=0.0.0.0" in command
    assert "kind: KIND_GPU gpus: [ 1 ]" in (tmp_path / "repo" / "sdxl_denoiser_1" / "config.pbtxt").read_text()
    orchestrator = (tmp_path / "repo" / "sdxl_orchestrator" / "config.pbtxt").read_text()
    assert '{ key: "max_steps" value: { string_value: "50" } }' in orchestrator


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "HYBRIDIFF_MODELS is required"),
        ({"HYBRIDIFF_MODELS": "sdxl"}, "'sdxl' is not family=checkpoint folder"),
        ({"HYBRIDIFF_MODELS": "sdxl=/a,sdxl=/b"}, "names a family twice"),
        ({"HYBRIDIFF_MODELS": "sdxl=/a", "HYBRIDIFF_KIND": "tpu"}, "HYBRIDIFF_KIND='tpu' must be cpu or gpu"),
        ({"HYBRIDIFF_MODELS": "sdxl=/a", "HYBRIDIFF_DEVICES": "two"}, "HYBRIDIFF_DEVICES='two' is not an integer"),
        ({"HYBRIDIFF_MODELS": "sdxl=/a", "HYBRIDIFF_DEVICES": "0"}, "HYBRIDIFF_DEVICES=0 must be >= 1"),
    ],
)
def test_entrypoint_names_the_bad_variable(env, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        entrypoint.main(["--dry-run"], env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --- the Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_builds_on_the_triton_release_of_the_bundled_server() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "nvcr.io/nvidia/tritonserver:24.10-py3")  # tritonserver 2.51
    assert sum(kind == "FROM" for kind, _ in instructions) == 1
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^nvidia-pytriton==0\.7\.0 .*tritonserver 2\.51", requirements, re.M)  # the wheel's release


def test_dockerfile_installs_everything_at_build_time_and_starts_the_entrypoint() -> None:
    instructions = dockerfile_instructions()
    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.M))
    # torch: the requirements pin, extracted by a grep that matches exactly that one line.
    grep = re.search(r"grep -E '(\^torch==)'", runs)
    assert grep and re.findall("^torch==", (REPO / "requirements.txt").read_text(), re.M) == ["torch=="]
    # The rest of requirements.txt, less tools the server does not import; each excluded name is real.
    excluded = re.search(r"grep -vE '\^\(([^)]*)\)=='", runs).group(1).split("|")
    assert set(excluded) <= {name.split("[")[0] for name in pins}, excluded
    assert {"torch", "pytest", "ruff"} <= set(excluded) and "diffusers" not in excluded
    assert "nvidia-pytriton" not in excluded  # the stub for the venv's Python comes from the wheel
    assert "pip install --no-cache-dir -r /tmp/serve-requirements.txt" in runs
    assert "pip install --no-cache-dir --no-deps ." in runs
    # What the image copies exists and is not excluded by .dockerignore (which ignores everything else).
    copies = [args.split()[0] for kind, args in instructions if kind == "COPY"]
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for source in copies:
        assert (REPO / source).exists() and source.rstrip("/") in allowed, source
    # Installation happens in RUN steps before the entrypoint; nothing is installed when a container starts.
    kinds = [kind for kind, _ in instructions]
    assert kinds[-1] == "ENTRYPOINT" and kinds.count("ENTRYPOINT") == 1 and "CMD" not in kinds
    assert json.loads(instructions[-1][1]) == ["python", "-m", "deploy.entrypoint"]
    assert (REPO / "deploy" / "entrypoint.py").is_file() and entrypoint.main.__module__ == "deploy.entrypoint"
    env = " ".join(args for kind, args in instructions if kind == "ENV")
    assert "HYBRIDIFF_SERVER_ROOT=/opt/tritonserver" in env and "HYBRIDIFF_KIND=gpu" in env


# --- the Kubernetes manifests -----------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """kind -> object, for every document under deploy/kubernetes."""
    objects = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def test_manifests_cover_the_deployment() -> None:
    kinds = set(manifests())
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                  "ConfigMap"])
def test_manifest_is_valid_against_the_kubernetes_schema(kind, version) -> None:
    kubernetes_validate.validate(manifests()[kind], version, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The schema check can fail: a typo or a wrong type in the Deployment is an error."""
    deployment = manifests()["Deployment"]
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[-1], strict=True)


def test_manifests_agree_with_each_other_and_the_code() -> None:
    objects = manifests()
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        spec = objects[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    # Two GPUs per pod, one denoiser each; the entrypoint accepts the pod's environment as it is.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2 == int(env["HYBRIDIFF_DEVICES"])
    repo_args = entrypoint.repository_argv(env)
    assert repo_args[repo_args.index("--kind") + 1] == "gpu"
    assert [f for f, _ in entrypoint.parse_models(env["HYBRIDIFF_MODELS"])] == ["sdxl", "sd3"]
    assert probe.configured_families(env) == ["sdxl", "sd3"]  # the probe reads the same setting
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]

    # Readiness and liveness run the probe command, with arguments its parser accepts, on the HTTP port.
    for name in ("readinessProbe", "livenessProbe"):
        command = container[name]["exec"]["command"]
        assert command[:3] == ["python", "-m", "hybridiff.probe"], name
        args = probe.build_parser().parse_args(command[3:])
        assert args.url == f"127.0.0.1:{ports['http']}"
        assert container[name]["timeoutSeconds"] > args.timeout
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"

    # /dev/shm is memory-backed and far above Docker's 64 MiB default.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (shm,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"] == "4Gi"


def test_autoscaler_metric_comes_from_the_adapter_rule() -> None:
    objects = manifests()
    (metric,) = objects["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    # Triton's own gauge (test_probe.py checks the server exports it per public model), per pod.
    assert rule["seriesQuery"].startswith("nv_inference_pending_request_count{")
    assert re.search(r"^" + rule["name"]["matches"].strip("^$") + "$", "nv_inference_pending_request_count")
    assert 'model=~"[^_]+"' in rule["seriesQuery"] and 'model=~"[^_]+"' in rule["metricsQuery"]
    public = re.compile(r"[^_]+")  # Prometheus anchors the regex: the family names, no internal model
    assert all(public.fullmatch(m) for m in ("sdxl", "sd3"))
    assert not any(public.fullmatch(m) for m in ("sdxl_vae", "sd3_text_encoder", "sdxl_denoiser_0"))
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_launcher_with_a_server_root_takes_its_backend_and_the_wheels_stub(tmp_path) -> None:
    """In the image: the backend library of /opt/tritonserver, the stub for the venv's Python from the wheel."""
    from hybridiff.tritonserver import prepare_backend_dir, server_command, stub_path

    root = tmp_path / "tritonserver"
    (root / "backends" / "python").mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (root / "backends" / "python" / name).write_text(f"image's {name}")
    python_dir = prepare_backend_dir(tmp_path / "be", server_root=root) / "python"
    assert (python_dir / "libtriton_python.so").read_text() == "image's libtriton_python.so"
    assert (python_dir / "triton_python_backend_utils.py").read_text() == "image's triton_python_backend_utils.py"
    assert (python_dir / "triton_python_backend_stub").resolve() == stub_path().resolve()
    command = server_command(tmp_path / "repo", tmp_path / "be", server_root=root)
    assert command[0] == str(root / "bin" / "tritonserver")
    assert f"--cache-directory={root / 'caches'}" in command
