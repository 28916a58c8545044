"""Benchmark and fidelity harness: latency, speed-up, efficiency, overhead, bytes and PSNR/SSIM.

    python -m bench                      # starts a server on the small model
    python -m bench --url 127.0.0.1:8000 # or measures a running one

Sends the same prompts and seeds in every mode. Each round first times the pieces on one device in
this process (for the ideal latency of each mode) and runs diffusers' own pipeline with every core
(the single-process alternative), then sends that round's requests, modes interleaved. Speed-ups are
medians of ratios paired within a round and prompt, and each run's efficiency uses its own round's
timings: this VM's speed drifts by 10-30% over minutes, and only figures taken close together in
time compare like with like. Writes bench.json, bench.md and bench.png to --out. Every figure is
measured in this run; nothing is typed in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.measure import PROMPTS, DiffusersAllCores, Neighbour, OneDevice, device_and_neighbour, run_round
from bench.report import machine_line, write_report
from bench.stats import ComponentTimes, Run, ceiling_summary, summarize
from client.generate import generate, make_client


def probe_machine(families: list[str], checkpoints: dict[str, Path], args: argparse.Namespace) -> None:
    """``--contention-only`` / ``--ceiling-only``: the machine probes alone, without a server."""
    for family in families:
        with device_and_neighbour(family, checkpoints[family], args.size) as (device, neighbour):
            if args.contention_only:
                times = device.measure(repeats=6, neighbour=neighbour)
                print(f"{family}: batch-1 forward {times.full[1]:.3f} s alone, "
                      f"{times.full1_beside_busy_core:.3f} s beside a busy core ({times.contention:.2f}x)")
            if args.ceiling_only:
                pairs = device.ceiling(neighbour, args.ceiling_rounds, repeats=5)
                summary = ceiling_summary(pairs)
                rounds = ", ".join(f"{serial:.3f}/{lockstep:.3f}" for serial, lockstep in pairs)
                print(f"{family}: serial step / cfg_parallel lockstep step per round (s): {rounds}")
                print(f"{family}: cfg_parallel ceiling without a server: {summary['median']:.2f}x median "
                      f"(per round {', '.join(f'{r:.2f}' for r in summary['per_round'])})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server's HTTP host:port (default: start one)")
    parser.add_argument("--families", default="sdxl,sd3", help="comma-separated: sdxl, sd3")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument("--checkpoint-size", default="small")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=2, help=f"how many of the {len(PROMPTS)} built-in prompts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--contention-only", action="store_true", help="only run the contention probe")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only measure the machine's cfg_parallel ceiling, without a server")
    parser.add_argument("--ceiling-rounds", type=int, default=6)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from hybridiff.families import get_family
    from hybridiff.serving_defaults import read_serving_defaults

    families = args.families.split(",")
    checkpoints = {f: args.checkpoints / f"{f}-{args.checkpoint_size}" for f in families}
    if args.contention_only or args.ceiling_only:
        probe_machine(families, checkpoints, args)
        return

    guidance = {f: read_serving_defaults(checkpoints[f], get_family(f).defaults).guidance_scale for f in families}
    one_device = {f: OneDevice(f, checkpoints[f], args.size) for f in families}
    neighbours = {f: Neighbour(f, checkpoints[f], args.size) for f in families}
    alternative = {f: DiffusersAllCores(checkpoints[f], guidance[f], args.steps, args.size) for f in families}
    runs: dict[str, list[Run]] = {f: [] for f in families}
    components: dict[str, list[ComponentTimes]] = {f: [] for f in families}
    diffusers: dict[str, dict[tuple[int, int], float]] = {f: {} for f in families}
    from tools.triton_process import server_unless_given

    with server_unless_given(args.repository, args.url, ready_timeout=900) as server:
        url = server.http_url if server is not None else args.url
        try:
            client = make_client("http", url, connection_timeout=3600, network_timeout=3600)
            for family in families:
                warm = {"steps": 4, "height": args.size, "width": args.size}
                generate(client, "http", family, ["warm-up"], mode="hybrid", **warm)
            for round_index in range(args.repeats):
                for family in families:
                    components[family].append(one_device[family].measure(repeats=5, neighbour=neighbours[family]))
                    for prompt in range(args.prompts):
                        diffusers[family][round_index, prompt] = alternative[family].latency(prompt)
                    runs[family] += run_round(client, "http", family, guidance[family], round_index,
                                              steps=args.steps, size=args.size, prompts=args.prompts)
            client.close()
        finally:
            for neighbour in neighbours.values():
                neighbour.close()
    summaries = {}
    for family in families:
        threads = alternative[family].threads
        summaries[family] = summarize(runs[family], components[family], diffusers[family], threads, args.steps)
    machine = machine_line(args.checkpoint_size, args.steps, args.size, args.prompts, args.repeats)
    print("\n".join(write_report(args.out, machine, summaries)))


if __name__ == "__main__":
    main()
