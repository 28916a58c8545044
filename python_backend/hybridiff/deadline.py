"""A deadline-aware choice for ``auto``: which mode a request runs, from the work already on the devices.

``place_request`` (schedule.py) looks only at how many requests each device runs. This policy also
weighs how much work they have left and the newcomer's deadline: a device shared by requests is
modelled as processor sharing (every request on it advances at the same rate, batching making a
shared step cheaper than two), so a request's predicted latency is its own work plus the part of
every neighbour's remaining work that overlaps it. Two idle devices are split (the capacity that
splitting wastes would idle anyway); otherwise it takes the least device time that meets the
deadline (serial), both devices only when serial would miss and splitting would not, and the
fastest placement when nothing meets it. A run that may still yield gives a device back when a
newcomer would otherwise miss its deadline (:func:`give_back`).
Plain Python, unit-tested on given loads (tests/test_deadline.py); not yet wired into the
orchestrator, whose load board records only request counts per device.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule import Mode


@dataclass(frozen=True)
class Costs:
    """What denoising costs on this deployment (to be measured, e.g. with ``make bench``)."""

    step_s: float  # one serial step of this request's size, on an idle device
    parallel_speedup: float = 1.6  # a two-device step (cfg_parallel / hybrid) vs a serial step, in [1, 2]
    batch_gain: float = 1.5  # two requests sharing a device vs the same two run back to back, in [1, 2]

    @property
    def overlap_cost(self) -> float:
        """Extra seconds per second of overlap with one neighbour on the same device."""
        return 2.0 / self.batch_gain - 1.0


@dataclass(frozen=True)
class Choice:
    mode: Mode
    devices: tuple[int, ...]
    predicted_s: float


def overlap_latency(own_s: float, neighbours_s: list[float], costs: Costs) -> float:
    """Latency of ``own_s`` seconds of solo work on a device whose other requests have ``neighbours_s``
    seconds of solo work left: each neighbour slows us for as long as both run."""
    return own_s + costs.overlap_cost * sum(min(n, own_s) for n in neighbours_s)


def choose(
    steps: int,
    deadline_s: float | None,
    remaining_steps: list[list[int]],
    costs: Costs,
    guidance: bool = True,
) -> Choice:
    """The mode for a new ``auto`` request of ``steps`` steps with ``deadline_s`` seconds to finish.

    ``remaining_steps[d]``: the steps each request on device ``d`` has left (a two-device request is
    listed on both). Both devices idle: ``hybrid`` (the capacity splitting wastes is idle anyway).
    Otherwise serial on the device that finishes it first, if that meets the deadline; else both
    least busy devices (``cfg_parallel``) if that does; else whichever is predicted fastest.
    """
    own_s = steps * costs.step_s
    work = [[r * costs.step_s for r in device] for device in remaining_steps]
    serial = min(
        (Choice(Mode.SERIAL, (d,), overlap_latency(own_s, work[d], costs)) for d in range(len(work))),
        key=lambda c: (c.predicted_s, c.devices),
    )
    if not guidance or len(work) < 2:
        return serial
    order = sorted(range(len(work)), key=lambda d: (sum(work[d]), d))
    pair = (min(order[:2]), max(order[:2]))
    split_s = own_s / costs.parallel_speedup
    if not work[pair[0]] and not work[pair[1]]:
        return Choice(Mode.HYBRID, pair, split_s)
    parallel = Choice(Mode.CFG_PARALLEL, pair, max(overlap_latency(split_s, work[d], costs) for d in pair))
    if deadline_s is None or serial.predicted_s <= deadline_s:
        return serial
    if parallel.predicted_s <= deadline_s:
        return parallel
    return min((serial, parallel), key=lambda c: (c.predicted_s, len(c.devices)))


def give_back(pair_remaining_steps: int, newcomer_steps: int, newcomer_deadline_s: float, costs: Costs) -> bool:
    """Whether a two-device run that may still yield should finish on one device for a newcomer.

    True when the newcomer, sharing a device with the two-device run, would miss its deadline, and
    would meet it on the device the run gives back (the run's remaining work is counted at its
    two-device speed). The run itself then goes on serially, as ``yield_device`` does today.
    """
    newcomer_s = newcomer_steps * costs.step_s
    pair_s = pair_remaining_steps * costs.step_s / costs.parallel_speedup
    shared = overlap_latency(newcomer_s, [pair_s], costs)
    return shared > newcomer_deadline_s >= newcomer_s
