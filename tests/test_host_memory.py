"""Freed activation memory stays mapped: a denoiser-like process stops page-faulting per forward."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hybridiff.host_memory import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

# Alternating batch 1 and 2 on a thread other than the main one: what a Triton stub's execute
# thread does when one device serves serial (batch 2) and cfg_parallel (batch 1) requests.
SCRIPT = textwrap.dedent("""
    import resource, sys, threading, torch
    sys.path.insert(0, sys.argv[2])
    torch.set_num_threads(1)
    if sys.argv[1] == "placement":
        from hybridiff.triton.common import InstanceDevice
        InstanceDevice(torch.device("cpu"), torch.float32, None).apply(threads=1)
    torch.manual_seed(0)
    layers = [m for _ in range(6) for m in (torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU())]
    net = torch.nn.Sequential(*layers)
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def serve():
        with torch.inference_mode():
            for batch in (2, 1, 2, 1):  # warm-up: the peak heap is reached here
                net(torch.randn(batch, 32, 96, 96))
            before = faults()
            for batch in (2, 2, 1, 1, 2, 1, 2, 1):
                net(torch.randn(batch, 32, 96, 96))
            print(faults() - before)
    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
""")


def _steady_faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, setting, str(ROOT / "python_backend")],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc are Linux's")
def test_stub_placement_stops_per_forward_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc")
    default = _steady_faults("default")
    kept = _steady_faults("placement")
    # Control: with glibc's defaults the same work faults in tens of MB per forward (~37,000 here).
    assert default > 5000, default
    assert kept < default / 20, (kept, default)
