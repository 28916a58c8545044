"""The deadline-aware choice for ``auto``: which mode a request runs, from the work already on the devices.

``place_request`` (schedule.py) looks only at how many requests each device runs. This policy also
weighs how much work they have left and the newcomer's deadline: a device shared by requests is
modelled as processor sharing (every request on it advances at the same rate, batching making a
shared step cheaper than two), so a request's predicted latency is its own work plus the part of
every neighbour's remaining work that overlaps it; a neighbour of another image size shares no
forward, so each of our steps waits for one of its steps. Two idle devices are split (the capacity that
splitting wastes would idle anyway); otherwise it takes the least device time that meets the
deadline (serial), both devices only when serial would miss and splitting would not, and the
fastest placement when nothing meets it. The degree of parallelism follows the load between steps:
a serial ``auto`` run takes a second device once it idles (:func:`grow_device`), and a split ``auto``
run gives one back as soon as another request is placed there (:func:`yield_device`), unless that
would make it late; the newcomer's choice counts on both. Admission rests on the same predictions:
a request that no placement finishes within its timeout without making a running request late is
refused at once (:func:`refusal`).

The numbers come from the in-flight board (``inflight.py``): each running request's devices, steps
left, deadline and cost key, and per cost key (family and image size) the seconds per step learned
online (:func:`learn`). Without them (no estimate yet for a request's size) ``auto`` falls back to
the count rule of ``place_request``. Plain Python, unit-tested on given loads (tests/test_deadline.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .admission import FULL
from .schedule import GuidanceSchedule, Mode, NoDeviceLeft, Placement, may_grow, may_yield, place_request
from .schedule import yield_device as yield_device_by_count

# Weight of the newest sample in the step-cost averages: a few steps follow a change of load or clocks.
EWMA_ALPHA = 0.2
DEFAULT_PARALLEL_SPEEDUP = 1.6
DEFAULT_BATCH_GAIN = 1.5
# A prediction "meets" a deadline only with this much to spare: the model leaves out what a step costs
# beyond its learned solo time (the other device computing slows a forward about 1.2x on this machine's
# shared cores, the board reads, the front's polls), and a request stopped at its last step has cost all
# of its work for nothing (docs/overload.md).
DEADLINE_MARGIN = 1.2


@dataclass(frozen=True)
class Costs:
    """What denoising costs on this deployment, for one image size (learned: :func:`costs_from`)."""

    step_s: float  # one serial step of this request's size, on an idle device
    parallel_speedup: float = DEFAULT_PARALLEL_SPEEDUP  # a two-device step vs a serial step, in [1, 2]
    batch_gain: float = DEFAULT_BATCH_GAIN  # two requests sharing a device vs the two back to back, in [1, 2]

    @property
    def overlap_cost(self) -> float:
        """Extra seconds per second of overlap with one neighbour on the same device."""
        return 2.0 / self.batch_gain - 1.0

    def seconds(self, steps: int, devices: int) -> float:
        """Solo seconds of ``steps`` steps on one device, or split over two."""
        return steps * self.step_s / (self.parallel_speedup if devices >= 2 else 1.0)


@dataclass(frozen=True)
class StepSample:
    """One measured step, as the loop saw it: what the board learns costs from."""

    kind: str  # "serial" (one device) or "split" (condition partitioning over two); others are not learned
    batched: int  # the most requests one device pass of the step served (1: alone)
    wall_s: float  # the step's wall time in the loop (compute, transfers, scheduler)
    compute_s: float  # the longest device compute of the step


def learn(estimate: dict[str, float], sample: StepSample, alone: bool = True, alpha: float = EWMA_ALPHA,
          pair: bool = False) -> None:
    """Fold one step into a cost key's averages (in place).

    ``serial`` and ``split``: wall seconds of steps that ran ``alone`` (no other request on the step's
    devices: what a request's latency is made of without neighbours, whom the overlap model adds).
    ``serial_pair``: wall seconds of a serial step whose device one other request of this size shared
    (``pair``): what sharing costs as it happens, whether the batcher merged the two passes or the device
    ran them in turn (two requests stepping in alternation rarely meet in its queue). ``serial_compute``
    and ``pair_compute``: device seconds of a serial pass alone and of one merged pass of two, the batching
    gain when it happens; used until ``serial_pair`` is measured. Steps shared by more are not learned.
    """

    def fold(name: str, value: float) -> None:
        old = estimate.get(name)
        estimate[name] = value if old is None else (1 - alpha) * old + alpha * value

    if sample.kind == "serial" and pair:
        fold("serial_pair", sample.wall_s)
    if sample.kind == "serial" and sample.batched <= 1:
        if alone:
            fold("serial", sample.wall_s)
        fold("serial_compute", sample.compute_s)
    elif sample.kind == "serial" and sample.batched == 2:
        fold("pair_compute", sample.compute_s)
    elif sample.kind == "split" and sample.batched <= 1 and alone:
        fold("split", sample.wall_s)


def costs_from(estimate: Mapping[str, float] | None) -> Costs | None:
    """The costs a key's averages give, or None before a serial step of that key was measured."""
    if not estimate or not estimate.get("serial"):
        return None
    serial = estimate["serial"]
    speedup = serial / estimate["split"] if estimate.get("split") else DEFAULT_PARALLEL_SPEEDUP
    gain = DEFAULT_BATCH_GAIN
    if estimate.get("serial_pair"):  # two requests' steps on one device took this long each, as it happened
        gain = 2.0 * serial / estimate["serial_pair"]
    elif estimate.get("pair_compute") and estimate.get("serial_compute"):
        gain = 2.0 * estimate["serial_compute"] / estimate["pair_compute"]
    return Costs(serial, min(max(speedup, 1.0), 2.0), min(max(gain, 1.0), 2.0))


@dataclass(frozen=True)
class Running:
    """A request on the board as the policy sees it."""

    devices: tuple[int, ...]
    remaining_s: float  # solo seconds of work left at its placement's speed
    deadline_s: float | None = None  # seconds until its deadline; None: none
    may_yield: bool = False  # a split auto run that can still finish on one device
    cost_key: str = ""  # family and image size: requests of one key share a device's forwards
    step_s: float = 0.0  # seconds of one of its steps alone at its placement's speed

    def as_neighbour(self, cost_key: str | None) -> Neighbour:
        """This run as seen by a request of ``cost_key`` sharing a device with it (None: the same size)."""
        foreign = cost_key is not None and self.cost_key != cost_key and self.step_s > 0
        return Neighbour(self.remaining_s, self.step_s if foreign else None)


@dataclass(frozen=True)
class Neighbour:
    """Work left on a device we share. ``step_s`` None: a request of our size, whose steps batch with
    ours (processor sharing at the batching gain); else its seconds per step: another size shares no
    forward, so the device alternates its steps with ours, one of its steps per one of ours."""

    remaining_s: float
    step_s: float | None = None

    def delay(self, own_s: float, own_step_s: float | None, costs: Costs) -> float:
        """Seconds it adds to ``own_s`` seconds of our work in steps of ``own_step_s``."""
        if self.step_s is None or not own_step_s:
            return costs.overlap_cost * min(self.remaining_s, own_s)
        return min(self.remaining_s, own_s / own_step_s * self.step_s)

    def later(self, seconds: float) -> Neighbour:
        return Neighbour(max(self.remaining_s - seconds, 0.0), self.step_s)


def running_from(
    jobs: Mapping[str, Mapping], estimates: Mapping[str, Mapping[str, float]], now: float
) -> dict[str, Running] | None:
    """The board's jobs (key -> devices, steps_left, deadline, cost_key, may_yield) as :class:`Running`,
    or None when a job's size has no cost estimate yet (the policy then has no numbers to weigh)."""
    running = {}
    for key, job in jobs.items():
        if job.get("waiting"):  # admitted by the front, on no device yet (waiting_from)
            continue
        costs = costs_from(estimates.get(job.get("cost_key", "")))
        if costs is None or "steps_left" not in job:
            return None
        deadline = job.get("deadline")
        devices = len(set(job["devices"]))
        running[key] = Running(
            tuple(job["devices"]),
            costs.seconds(int(job["steps_left"]), devices),
            None if deadline is None else deadline - now,
            bool(job.get("may_yield", False)),
            job.get("cost_key", ""),
            costs.seconds(1, devices),
        )
    return running


def waiting_from(jobs: Mapping[str, Mapping], estimates: Mapping[str, Mapping[str, float]]) -> list[float] | None:
    """Solo serial seconds of each request the front admitted that no orchestrator placed yet, or None when
    one's size has no cost estimate."""
    waiting = []
    for job in jobs.values():
        if job.get("waiting"):
            costs = costs_from(estimates.get(job.get("cost_key", "")))
            if costs is None:
                return None
            waiting.append(costs.seconds(int(job.get("steps_left", 0)), 1))
    return waiting


def arrival_refusal(own_s: float, deadline_s: float | None, running: Sequence[Running], waiting_s: Sequence[float],
                    costs: Costs, num_up: int, slots: int) -> str | None:
    """Why the front refuses a request on arrival, or None to admit it (it then waits for an orchestrator
    instance, and :func:`place` decides again once one takes it).

    A request that an orchestrator instance takes at once (fewer than ``slots`` held) is left to
    :func:`place`, which prices it exactly a moment later. One that must wait is refused now if it could
    not finish in time even at the earliest: it starts once as many requests finished as it waits behind
    beyond the free slots (no sooner than the one with that rank in remaining work), and not before the
    ``num_up`` devices have worked off everything ahead of it (each running request's remaining work on
    each of its devices, each waiting request's whole run) at their shared rate (the batching gain); then
    it runs serially alone, ``own_s``. Without this, it would wait in the queue until an instance took it
    and be refused then, or run and be late.
    """
    held = len(running) + len(waiting_s)
    if deadline_s is None or num_up < 1 or held < slots:
        return None
    finishes = sorted(r.remaining_s for r in running)
    rank = held - slots + 1  # finished requests that free a slot for it
    start_s = finishes[min(rank, len(finishes)) - 1] if finishes else 0.0
    ahead_s = sum(r.remaining_s * len(set(r.devices)) for r in running) + sum(waiting_s)
    earliest_s = max(start_s, ahead_s / (num_up * costs.batch_gain)) + own_s
    if earliest_s * DEADLINE_MARGIN <= deadline_s:  # the margin placement will ask of it too
        return None
    return (
        f"{FULL}: the request cannot finish within its timeout behind the {held} requests the server holds "
        f"({max(deadline_s, 0):.2f} s left, {earliest_s:.2f} s at the earliest); "
        "retry later or with a longer timeout"
    )


@dataclass(frozen=True)
class Choice:
    """A placement with its predicted latency; ``meets``: it meets the newcomer's deadline without pushing a
    running request past its own (always True without a deadline)."""

    mode: Mode
    devices: tuple[int, ...]
    predicted_s: float
    meets: bool = True


def overlap_latency(own_s: float, neighbours: Sequence[float | Neighbour], costs: Costs,
                    own_step_s: float | None = None) -> float:
    """Latency of ``own_s`` seconds of solo work (in steps of ``own_step_s``) on a device shared with
    ``neighbours`` (a float: a neighbour of our size with that many seconds left): each slows us for as
    long as both run (:meth:`Neighbour.delay`)."""
    return own_s + sum((n if isinstance(n, Neighbour) else Neighbour(n)).delay(own_s, own_step_s, costs)
                       for n in neighbours)


def keeps_pair(run: Running, costs: Costs) -> bool:
    """Whether a split ``auto`` run keeps both devices when another request shares one: only when going on
    serially would make it late and keeping both would not. Otherwise it gives one back (a split step
    costs more device time than a serial one, and waits for the busier device)."""
    if run.deadline_s is None:
        return False
    return run.remaining_s * costs.parallel_speedup > run.deadline_s >= run.remaining_s


def yields(run: Running, costs: Costs) -> bool:
    """Whether ``run`` gives a device back to a newcomer placed on it (see :func:`keeps_pair`)."""
    return run.may_yield and len(set(run.devices)) == 2 and not keeps_pair(run, costs)


def pushes_late(devices: Sequence[int], own_s: float, running: Sequence[Running], costs: Costs,
                spared: Sequence[Running] = (), cost_key: str | None = None,
                own_step_s: float | None = None) -> list[Running]:
    """The running requests that a newcomer with ``own_s`` seconds of solo work (in steps of
    ``own_step_s``, of size ``cost_key``; None: the same size as every run) on ``devices`` would push past
    their deadlines: each one sharing a device with it is slowed for as long as both run, and counts if
    it meets its deadline now and would not then. ``spared``: runs that give the device back instead.

    Admitted requests come first: a newcomer that would make one of them late is placed elsewhere or
    refused (:func:`choose`), so an overload costs the newcomers, not the requests half done.
    """
    late = []
    for run in running:
        if run.deadline_s is None or any(run is s for s in spared) or not set(devices) & set(run.devices):
            continue
        seen_by = run.cost_key or None
        others = [o.as_neighbour(seen_by) for o in running if o is not run and set(o.devices) & set(run.devices)]
        now = overlap_latency(run.remaining_s, others, costs, run.step_s)
        foreign = cost_key is not None and seen_by is not None and cost_key != seen_by
        newcomer = Neighbour(own_s, own_step_s if foreign else None)
        slowed = now + newcomer.delay(run.remaining_s, run.step_s, costs)
        if now * DEADLINE_MARGIN <= run.deadline_s < slowed * DEADLINE_MARGIN:
            late.append(run)
    return late


def choose(
    steps: int,
    deadline_s: float | None,
    running: Sequence[Running],
    costs: Costs,
    num_devices: int,
    guidance: bool = True,
    up: Sequence[bool] | None = None,
    cost_key: str | None = None,
    queued: bool = False,
) -> Choice:
    """The mode for a new ``auto`` request of ``steps`` steps with ``deadline_s`` seconds to finish
    (of size ``cost_key``, against which neighbours of other sizes are priced; None: all one size).

    Both least busy devices idle: ``hybrid``. Otherwise serial on the device that finishes it first,
    if that meets the deadline (a split auto run there that gives the device back, by :func:`yields`,
    is not counted; a serial run takes a second device once one is idle, by :func:`grow_device`, which
    the prediction counts on); else both least busy devices (``cfg_parallel``) if that does; else
    whichever is predicted fastest, marked as not meeting it. A placement that would push a running
    request past its deadline (:func:`pushes_late`) does not count as meeting it. Only devices that are
    ``up`` are chosen; ties go to less work left, then to the lower index. ``queued``: other requests wait
    to be placed, and take a device as it frees, so a serial run is not counted on to grow.
    """
    candidates = [d for d in range(num_devices) if up is None or up[d]]
    if not candidates:
        raise NoDeviceLeft(f"all {num_devices} devices are down")
    own_s = steps * costs.step_s
    split_step_s = costs.seconds(1, 2)
    yielding = [r for r in running if yields(r, costs)]

    def neighbours(device: int, alone_here: bool) -> list[Neighbour]:
        return [r.as_neighbour(cost_key) for r in running
                if device in r.devices and not (alone_here and any(r is y for y in yielding))]

    def work_left(device: int, alone_here: bool) -> float:
        return sum(n.remaining_s for n in neighbours(device, alone_here))

    def free_after(device: int) -> float:
        """When ``device`` has no other request left (a yielding split run there goes on serially)."""
        return max((r.remaining_s * (costs.parallel_speedup if any(r is y for y in yielding) else 1.0)
                    for r in running if device in r.devices), default=0.0)

    def grown_latency(device: int, serial_s: float) -> float:
        """Serial on ``device`` until another device is free, then partitioned over both (:func:`grow_device`)."""
        others = [d for d in candidates if d != device]
        if queued or not guidance or not others or costs.parallel_speedup <= 1.0:
            return serial_s
        wait = min(free_after(d) for d in others)
        if wait >= serial_s:
            return serial_s
        left = own_s * (1.0 - wait / serial_s)
        after = [n.later(wait) for n in neighbours(device, True)]
        return min(serial_s, wait + overlap_latency(left / costs.parallel_speedup, after, costs, split_step_s))

    def option(mode: Mode, devices: tuple[int, ...], work_s: float, alone_here: bool) -> Choice:
        step_s = costs.seconds(1, len(devices))
        predicted = max(overlap_latency(work_s, neighbours(d, alone_here), costs, step_s) for d in devices)
        if mode is Mode.SERIAL:
            predicted = grown_latency(devices[0], predicted)
        if deadline_s is None:
            return Choice(mode, devices, predicted)
        spared = yielding if alone_here else ()
        late = pushes_late(devices, work_s, running, costs, spared, cost_key, step_s)
        return Choice(mode, devices, predicted, predicted * DEADLINE_MARGIN <= deadline_s and not late)

    # Equal predictions (e.g. neighbours all longer than this request, or batching that looks free)
    # go to the device with less work left, then the lower index.
    serials = [option(Mode.SERIAL, (d,), own_s, True) for d in candidates]
    serial = min(serials, key=lambda c: (not c.meets, c.predicted_s, work_left(c.devices[0], True), c.devices))
    if not guidance or len(candidates) < 2:
        return serial
    order = sorted(candidates, key=lambda d: (work_left(d, False), d))
    pair = (min(order[:2]), max(order[:2]))
    split_s = own_s / costs.parallel_speedup
    if not neighbours(pair[0], False) and not neighbours(pair[1], False):
        return option(Mode.HYBRID, pair, split_s, False)
    parallel = option(Mode.CFG_PARALLEL, pair, split_s, False)
    if deadline_s is None or serial.meets:
        return serial
    if parallel.meets:
        return parallel
    return min((serial, parallel), key=lambda c: (c.predicted_s, len(c.devices)))


def predict(placement: Placement, steps: int, deadline_s: float | None, running: Sequence[Running],
            costs: Costs, cost_key: str | None = None) -> Choice:
    """The latency of an explicit placement on this load, and whether it meets ``deadline_s`` as :func:`choose`
    counts it (its own deadline, and no running request pushed past its own)."""
    devices = placement.devices
    step_s = costs.seconds(1, len(devices))
    work_s = steps * step_s
    predicted = max(
        overlap_latency(work_s, [r.as_neighbour(cost_key) for r in running if d in r.devices], costs, step_s)
        for d in devices
    )
    meets = deadline_s is None or (
        predicted * DEADLINE_MARGIN <= deadline_s
        and not pushes_late(devices, work_s, running, costs, (), cost_key, step_s)
    )
    return Choice(placement.mode, devices, predicted, meets)


def refusal(choice: Choice, deadline_s: float | None, idle: bool = False) -> str | None:
    """Why a request is refused at once instead of started, or None to start it.

    A request whose timeout no placement can meet on the current load would be stopped at that deadline
    with its work wasted, or would take the devices from requests that can still meet theirs: it is
    refused now, with the same retryable answer as a full queue. On an ``idle`` server nothing is refused:
    it costs no one else, and running is what refreshes an estimate that may have gone stale (with every
    request refused, none would).
    """
    if choice.meets or deadline_s is None or idle:
        return None
    return (
        f"{FULL}: the request cannot finish within its timeout on the current load ({max(deadline_s, 0):.2f} s "
        f"left, {choice.predicted_s:.2f} s predicted, or a running request would be made late); "
        "retry later or with a longer timeout"
    )


@dataclass(frozen=True)
class Decision:
    """A placement and what it was decided by: ``rule`` "deadline" (with the prediction) or "count";
    ``refused``: why it must not start (:func:`refusal`), None to start it."""

    placement: Placement
    rule: str
    predicted_s: float | None = None
    refused: str | None = None


def place(
    mode: Mode,
    guidance: bool,
    steps: int,
    deadline_s: float | None,
    costs: Costs | None,
    running: Sequence[Running] | None,
    loads: list[int],
    up: Sequence[bool] | None = None,
    admit_by_deadline: bool = True,
    cost_key: str | None = None,
    queued: bool = False,
) -> Decision:
    """Where a request runs: ``auto`` by :func:`choose` when the board has the numbers (``costs`` for
    the request's size, ``running`` for every job), every other case by ``place_request``'s count rule.

    With the numbers and a deadline, ``admit_by_deadline`` refuses (``Decision.refused``) a request of any
    mode that its placement cannot finish in time without making a running request late. ``queued``: see
    :func:`choose`.
    """
    counted = place_request(mode, loads, guidance, up)
    if costs is None or running is None:
        return Decision(counted, "count")
    if mode is not Mode.AUTO:
        predicted = predict(counted, steps, deadline_s, running, costs, cost_key)
        refused = refusal(predicted, deadline_s, idle=not running) if admit_by_deadline else None
        return Decision(counted, "count", predicted.predicted_s, refused)
    choice = choose(steps, deadline_s, running, costs, len(loads), guidance, up, cost_key, queued)
    if choice.mode is Mode.SERIAL:
        placement = Placement(Mode.SERIAL, choice.devices[0], counted.pair, guidance)
    else:
        placement = Placement(choice.mode, choice.devices[0], (choice.devices[0], choice.devices[1]), guidance)
    refused = refusal(choice, deadline_s, idle=not running) if admit_by_deadline else None
    return Decision(placement, "deadline", choice.predicted_s, refused)


@dataclass(frozen=True)
class BoardView:
    """The board as one request sees it: counts, itself and the others, and its size's costs.

    ``me``/``others`` are None when some job's size has no cost estimate yet (then the count rules apply).
    """

    loads: list[int]
    me: Running | None
    others: list[Running] | None
    costs: Costs | None
    up: list[bool] | None = None  # devices that may be placed on (None: all)


def view_of(snapshot, key: str | None, cost_key: str) -> BoardView:
    """``snapshot`` (an ``inflight.Snapshot``: loads, jobs, costs, now) from the request ``key`` (None:
    a newcomer not on the board yet) of cost key ``cost_key``."""
    running = running_from(snapshot.jobs, snapshot.costs, snapshot.now)
    costs = costs_from(snapshot.costs.get(cost_key))
    up = list(snapshot.up)
    if running is None:
        return BoardView(list(snapshot.loads), None, None, costs, up)
    others = [r for k, r in running.items() if k != key]
    return BoardView(list(snapshot.loads), running.get(key) if key is not None else None, others, costs, up)


def yield_device(schedule: GuidanceSchedule, step: int, view: BoardView) -> int | None:
    """For a split ``auto`` run that may still yield: the device to finish on alone, or None to keep both.

    With the board's numbers: yield as soon as another request shares one of its devices, unless going on
    serially would make the run late and keeping both would not (:func:`keeps_pair`); continue on the
    pair's device fewer others share (less work, then the lower index on ties). Without them: the count
    rule (``schedule.yield_device``).
    """
    if not may_yield(schedule, step):
        return None
    me, others, costs = view.me, view.others, view.costs
    if me is None or others is None or costs is None:
        return yield_device_by_count(schedule, step, view.loads)
    pair = set(schedule.pair)
    if not any(pair & set(o.devices) for o in others) or keeps_pair(me, costs):
        return None

    def busy(device: int) -> tuple[int, float, int]:
        on_it = [o for o in others if device in o.devices]
        return len(on_it), sum(o.remaining_s for o in on_it), device

    return min(schedule.pair, key=busy)


def grow_device(schedule: GuidanceSchedule, step: int, view: BoardView) -> int | None:
    """For an ``auto`` run on one device: an idle device to partition the remaining steps over, or None.

    A device no request occupies would idle: taking it finishes this run sooner at no one's cost, and the
    run gives it back as soon as another request is placed there (:func:`yield_device`). Not when the
    board measured a split step no faster than a serial one for this run's size.
    """
    if not may_grow(schedule, step):
        return None
    if view.costs is not None and view.costs.parallel_speedup <= 1.0:
        return None
    mine = schedule.serial_device
    idle = [d for d, load in enumerate(view.loads)
            if d != mine and load == 0 and (view.up is None or view.up[d])]
    return min(idle, default=None)
