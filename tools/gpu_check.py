"""`make gpu-check`: run the GPU deployment wherever a GPU is, and say what passed.

    python -m tools.gpu_check [--out out/gpu-check.md] [--size small] [--steps 20] [--side 512]

(a) In process, on CUDA with fp16, for both families: ``serial`` against diffusers' own pipeline,
``cfg_parallel`` against ``serial``, and each stage split against the whole model.
(b) If the server wheel (nvidia-pytriton) is importable: the real tritonserver on a ``--kind gpu``
repository (both denoisers on GPU 0 when there is only one GPU), every mode over HTTP and gRPC, with
the latency of each request in a table.

Without CUDA (this project's CI machine) both parts are reported as skipped, with the reason, and the
in-process checks run instead on CPU in fp32 at the tiny size, so the code of this check keeps working.
The checkpoints are the built-in ones with seeded random weights (the GPU machine has no internet), so
the comparisons are between implementations, not about picture quality. Exit status 1 when any check
failed. Tooling, not serving: it lives outside ``python_backend``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("sdxl", "sd3")
MODES = ("serial", "cfg_parallel", "pipeline", "hybrid", "auto")
PROMPT = "a lighthouse on a cliff at sunset, oil painting"
NEGATIVE = "blurry"
SEED = 7


@dataclass
class Row:
    """One line of the report."""

    part: str
    check: str
    result: str  # PASS, FAIL or SKIPPED
    detail: str
    seconds: float | None = None
    log: str = ""  # the whole error, for the report's failure details


@dataclass(frozen=True)
class Setup:
    """Where and how big the in-process checks run."""

    device: str
    dtype_name: str  # "float16" or "float32"
    size: str  # built-in checkpoint size
    steps: int
    side: int

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def fp16(self) -> bool:
        return self.dtype_name == "float16"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def images_agree(a: np.ndarray, b: np.ndarray, fp16: bool) -> tuple[bool, str]:
    """fp32: within 1 pixel level, as the CPU tests require; fp16 (other kernels, other rounding): 35 dB."""
    diff, db = max_pixel_diff(a, b), psnr(a, b)
    ok = db >= 35.0 if fp16 else diff <= 1
    return ok, f"max abs pixel diff {diff}, PSNR {db:.1f} dB ({'>= 35 dB' if fp16 else '<= 1'} required)"


def checkpoint(family: str, size: str) -> Path:
    from export.build_checkpoint import build_sd3_checkpoint, build_sdxl_checkpoint

    build = build_sdxl_checkpoint if family == "sdxl" else build_sd3_checkpoint
    return build(REPO / "checkpoints" / f"{family}-{size}", size=size)


def timed(rows: list[Row], part: str, check: str, run: Callable[[], tuple[bool, str]]) -> None:
    """Run one check; an exception is a FAIL with its last line, not the end of the report."""
    started = time.perf_counter()
    log = ""
    try:
        ok, detail = run()
    except Exception as err:  # reported, never hidden
        log = traceback.format_exc()
        print(log, flush=True)
        ok, detail = False, f"{type(err).__name__}: {err}".splitlines()[0][:300]
    rows.append(Row(part, check, "PASS" if ok else "FAIL", detail, time.perf_counter() - started, log))
    print(f"[{rows[-1].result}] {part}: {check}: {detail}", flush=True)


# --- (a) in process -----------------------------------------------------------------------------------


def diffusers_image(family: str, folder: Path, setup: Setup, guidance: float) -> np.ndarray:
    import torch
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(folder, torch_dtype=setup.dtype).to(setup.device)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=setup.steps, guidance_scale=guidance,
                 height=setup.side, width=setup.side, generator=torch.Generator("cpu").manual_seed(SEED),
                 output_type="np").images[0]
    del pipe
    return (image * 255).round().astype("uint8")


def stage_split_error(local, setup: Setup) -> tuple[bool, str]:
    """Stage 0 fed stage 1's same-step exports, then stage 1 fed stage 0's, against one whole pass."""
    import torch

    denoiser, latent_math = local.denoisers[0], local.latent_math
    extra = latent_math.extra_conditioning(setup.side, setup.side)
    cond = {**local.branch_conditioning(PROMPT, NEGATIVE)["cond"], **extra}
    latent_side = setup.side // latent_math.vae_scale_factor
    sample = torch.randn(1, latent_math.latent_channels, latent_side, latent_side,
                         generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    full = denoiser.run(sample, t, cond).eps.float()
    handed_back = denoiser.run(sample, t, cond, capture_stage=1).activations
    first = denoiser.run(sample, t, cond, stage=0, stale=handed_back)
    last = denoiser.run(sample, t, cond, stage=1, stale=first.activations)
    scale = full.abs().max().clamp_min(1e-12)
    error = float((last.eps.float() - full).abs().max() / scale)
    # The last stage must really use what it was handed: other activations, another output.
    noise = torch.Generator().manual_seed(1)  # random, not a constant shift, which layer norms would cancel
    other = {name: value + torch.randn(value.shape, generator=noise).to(value)
             for name, value in first.activations.items()}
    moved = float((denoiser.run(sample, t, cond, stage=1, stale=other).eps.float() - full).abs().max() / scale)
    bound = 1e-2 if setup.fp16 else 1e-4
    ok = first.eps is None and error <= bound < moved
    return ok, (f"max abs error / max abs output {error:.2e} (<= {bound:.0e} required); "
                f"{moved:.2e} with other activations handed on")


def in_process(family: str, setup: Setup, part: str) -> list[Row]:
    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import Mode

    rows: list[Row] = []
    folder = checkpoint(family, setup.size)
    local = LocalPipeline(family, folder, devices=2, device=setup.device, dtype=setup.dtype)
    defaults = local.defaults
    request = ImageRequest(seed=SEED, steps=setup.steps, guidance_scale=defaults.guidance_scale,
                           height=setup.side, width=setup.side, mode=Mode.SERIAL, knobs=defaults.knobs)
    images: dict[str, np.ndarray] = {}

    def mode_image(mode: str) -> np.ndarray:
        if mode not in images:
            image, report, _ = local.generate(PROMPT, dataclasses.replace(request, mode=Mode(mode)), NEGATIVE)
            assert report.schedule["mode_run"] == mode, report.schedule["mode_run"]
            images[mode] = image
        return images[mode]

    timed(rows, part, f"{family} serial = diffusers pipeline",
          lambda: images_agree(mode_image("serial"), diffusers_image(family, folder, setup,
                                                                     defaults.guidance_scale), setup.fp16))
    timed(rows, part, f"{family} cfg_parallel = serial",
          lambda: images_agree(mode_image("cfg_parallel"), mode_image("serial"), setup.fp16))
    timed(rows, part, f"{family} stage split = whole model", lambda: stage_split_error(local, setup))
    return rows


# --- (b) the real server ------------------------------------------------------------------------------


def share_gpu0(repository: Path) -> int:
    """Point every model's ``gpus`` at GPU 0 (one-GPU machines); returns how many configs changed."""
    changed = 0
    for config in repository.glob("*/config.pbtxt"):
        text = config.read_text()
        new = re.sub(r"gpus: \[ \d+ \]", "gpus: [ 0 ]", text)
        if new != text:
            config.write_text(new)
            changed += 1
    return changed


def server_checks(setup: Setup, repository: Path, part: str) -> list[Row]:
    import torch

    from client.generate import generate, make_client
    from export.make_repository import Deployment, write_repository
    from hybridiff.params import Limits
    from tools.triton_process import TritonServer

    rows: list[Row] = []
    folders = {family: checkpoint(family, setup.size) for family in FAMILIES}
    limits = Limits(max_height=max(setup.side, 64), max_width=max(setup.side, 64))
    write_repository(repository, folders, Deployment(devices=2, kind="gpu", limits=limits))
    if torch.cuda.device_count() < 2:
        share_gpu0(repository)
    started = time.perf_counter()
    with TritonServer(repository, ready_timeout=420) as server:  # within one 10-minute device call
        rows.append(Row(part, "server ready (KIND_GPU, fp16 between models)", "PASS",
                        f"{len(folders)} families, {torch.cuda.device_count()} GPU(s)",
                        time.perf_counter() - started))
        fields = dict(negative_prompt=NEGATIVE, seed=SEED, steps=setup.steps, height=setup.side, width=setup.side)
        for protocol in ("http", "grpc"):
            client = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
            try:
                for family in FAMILIES:
                    generate(client, protocol, family, [PROMPT], **{**fields, "mode": "serial", "steps": 1})  # warm
                    serial: dict[str, np.ndarray] = {}
                    for mode in MODES:
                        def one(mode=mode, family=family, client=client, protocol=protocol, serial=serial):
                            result = generate(client, protocol, family, [PROMPT], **fields, mode=mode)
                            ran = result.schedules[0]["mode_run"]
                            image = result.images[0]
                            if mode == "serial":
                                serial["image"] = image
                            detail = f"latency {result.latency:.3f} s, ran {ran}"
                            ok = ran == mode or mode == "auto"
                            if mode == "cfg_parallel":
                                agree, text = images_agree(image, serial["image"], fp16=True)
                                ok, detail = ok and agree, f"{detail}; vs serial: {text}"
                            return ok, detail

                        timed(rows, part, f"{family} {mode} over {protocol}", one)
            finally:
                client.close()
    return rows


# --- the report ---------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    import torch

    info = {"date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
            "torch": torch.__version__, "CUDA available": str(torch.cuda.is_available())}
    if torch.cuda.is_available():
        info["GPUs"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    for name in ("diffusers", "tritonclient", "pytriton"):
        spec = importlib.util.find_spec(name)
        info[name] = "present" if spec is not None else "missing"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "unknown"
    return info


def guarded(part: str, what: str, run: Callable[[], list[Row]]) -> list[Row]:
    """A part's rows, or one FAIL row with the whole error when the part could not even start."""
    try:
        return run()
    except Exception as err:  # e.g. the server did not get ready: its log tail is in the message
        log = traceback.format_exc()
        print(log, flush=True)
        return [Row(part, what, "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300], None, log)]


def report(info: dict[str, str], rows: list[Row], command: str) -> str:
    lines = ["# GPU check", "", f"`{command}`", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    counts = {r: sum(row.result == r for row in rows) for r in ("PASS", "FAIL", "SKIPPED")}
    lines += ["", f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIPPED']} skipped", ""]
    lines += ["| part | check | result | detail | seconds |", "|---|---|---|---|---|"]
    for row in rows:
        seconds = "" if row.seconds is None else f"{row.seconds:.2f}"
        lines.append(f"| {row.part} | {row.check} | {row.result} | {row.detail} | {seconds} |")
    failed = [row for row in rows if row.log]
    if failed:
        lines += ["", "## Failure details"]
        for row in failed:
            lines += ["", f"{row.part}: {row.check}", "", "```", row.log[-6000:].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "gpu-check.md", help="markdown report")
    parser.add_argument("--size", default="small", help="built-in checkpoint size on CUDA (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps on CUDA (default %(default)s)")
    parser.add_argument("--side", type=int, default=512, help="image side on CUDA (default %(default)s)")
    parser.add_argument("--no-server", action="store_true", help="skip part (b)")
    args = parser.parse_args(argv)

    import torch

    info = environment()
    rows: list[Row] = []
    cuda = torch.cuda.is_available()
    part_a, part_b, part_cpu = "(a) CUDA fp16, in process", "(b) server, KIND_GPU", "CPU fp32 stand-in (tiny)"
    if cuda:
        gpu = Setup("cuda", "float16", args.size, args.steps, args.side)
        for family in FAMILIES:
            rows += guarded(part_a, f"{family}: load", lambda f=family: in_process(f, gpu, part_a))
        if args.no_server:
            rows.append(Row(part_b, "every mode over HTTP and gRPC", "SKIPPED", "--no-server"))
        elif importlib.util.find_spec("pytriton") is None:
            rows.append(Row(part_b, "every mode over HTTP and gRPC", "SKIPPED",
                            "nvidia-pytriton is not installed (bring the wheels: make gpu-wheels)"))
        else:
            repository = REPO / "build" / "gpu-check" / "model_repository"
            rows += guarded(part_b, "server start", lambda: server_checks(gpu, repository, part_b))
    else:
        reason = "no CUDA device: torch.cuda.is_available() is False"
        rows.append(Row(part_a, "serial/cfg_parallel/stage split, sdxl and sd3", "SKIPPED", reason))
        rows.append(Row(part_b, "every mode over HTTP and gRPC", "SKIPPED", reason))
        cpu = Setup("cpu", "float32", "tiny", 4, 64)
        for family in FAMILIES:
            rows += guarded(part_cpu, f"{family}: load", lambda f=family: in_process(f, cpu, part_cpu))

    command = "python -m tools.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(info, rows, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 1 if any(row.result == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
