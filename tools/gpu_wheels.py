"""`make gpu-wheels`: the wheels `make gpu-check` needs on a GPU machine with PyTorch and no internet.

    python -m tools.gpu_wheels [--out gpu-wheels] [--python-version 3.12]

Downloads, for that Python on x86-64 Linux, the packages the GPU image lacks: diffusers, tritonclient
and nvidia-pytriton at the versions of requirements.txt, and the few of their needs the image does
not hold (at the versions installed here, where the tests ran with them). The nvidia-pytriton wheel
ships a Python-backend stub for six Python versions and a vendored libpython 3.13 for one of them;
only the stub for the target Python is kept (a rewritten wheel, its RECORD updated), which brings the
folder from about 65 MiB to about 50. Prints the folder's size against the 60 MiB that travels.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 60
FROM_REQUIREMENTS = ("diffusers", "tritonclient", "nvidia-pytriton")
# Needs of those that the GPU image (device KINDS.md's package list) lacks: tritonclient's HTTP client
# (geventhttpclient and its gevent stack), its JSON (python-rapidjson), and diffusers' importlib_metadata.
MISSING_ON_GPU = ("importlib_metadata", "python-rapidjson", "geventhttpclient", "gevent", "greenlet",
                  "zope.event", "zope.interface", "brotli")
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def pins(requirements: Path = REPO / "requirements.txt") -> list[str]:
    """``name==version`` for every wheel to bring."""
    text = requirements.read_text()
    found = []
    for name in FROM_REQUIREMENTS:
        match = re.search(rf"^{re.escape(name)}(?:\[[^\]]*\])?==(\S+)", text, re.M)
        if match is None:
            raise ValueError(f"{requirements} pins no {name}")
        found.append(f"{name}=={match.group(1)}")
    found += [f"{name}=={importlib.metadata.version(name)}" for name in MISSING_ON_GPU]
    return found


def trim_pytriton(wheel: Path, python_version: str) -> int:
    """Rewrite the nvidia-pytriton wheel without the stubs (and vendored libpython) of other Pythons.

    Returns the bytes saved. Idempotent: a trimmed wheel has nothing left to drop.
    """
    minor = python_version.split(".")[1]

    def dropped(name: str) -> bool:
        stub = re.match(r"pytriton/tritonserver/python_backend_stubs/([0-9.]+)/", name)
        if stub and stub.group(1) != python_version:
            return True
        libpython = re.match(r"nvidia_pytriton\.libs/libpython3-[0-9a-f]+\.(\d+)\.so", name)
        return bool(libpython and libpython.group(1) != minor)

    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as source:
        entries = source.infolist()
        if not any(dropped(e.filename) for e in entries):
            return 0
        trimmed = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for entry in entries:
                if dropped(entry.filename):
                    continue
                data = source.read(entry)
                if entry.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
                target.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED)
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


def download(out: Path, python_version: str) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(out), *pins()]
    subprocess.run(command, check=True)


def folder_mib(out: Path) -> float:
    return sum(p.stat().st_size for p in out.glob("*.whl")) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_wheels", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu-wheels")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    download(args.out, args.python_version)
    for wheel in args.out.glob("nvidia_pytriton-*.whl"):
        saved = trim_pytriton(wheel, args.python_version)
        print(f"{wheel.name}: kept the Python {args.python_version} stub only, {saved / 2**20:.1f} MiB less")
    size = folder_mib(args.out)
    for wheel in sorted(args.out.glob("*.whl")):
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    verdict = "fits" if size <= LIMIT_MIB else "does NOT fit"
    print(f"{args.out}: {size:.1f} MiB, {verdict} in {LIMIT_MIB} MiB")
    return 0 if size <= LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
