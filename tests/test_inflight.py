"""The load-aware policy (plain Python) and the shared in-flight board it reads."""

import multiprocessing
import os

import pytest

from hybridiff.inflight import WAITING_PREFIX, InFlightBoard
from hybridiff.schedule import Mode, place_request


@pytest.mark.parametrize(
    "loads,mode,device,pair",
    [
        ([0, 0], Mode.HYBRID, 0, (0, 1)),  # alone: split the image over both devices
        ([1, 1], Mode.SERIAL, 0, (0, 1)),  # both busy: whole request on the least busy (tie -> 0)
        ([1, 0], Mode.SERIAL, 1, (0, 1)),  # one busy: a hybrid would wait on it, so serial on the free one
        ([2, 1], Mode.SERIAL, 1, (0, 1)),
        ([1, 0, 0, 2], Mode.HYBRID, 1, (1, 2)),  # four devices: any idle pair serves a hybrid
        ([0], Mode.SERIAL, 0, (0, 0)),  # one device
    ],
)
def test_auto_follows_the_load(loads, mode, device, pair):
    placement = place_request(Mode.AUTO, loads, guidance=True)
    assert (placement.mode, placement.device, placement.pair) == (mode, device, pair)


def test_auto_without_guidance_is_serial():
    assert place_request(Mode.AUTO, [0, 0], guidance=False).mode is Mode.SERIAL


@pytest.mark.parametrize("mode", [Mode.SERIAL, Mode.CFG_PARALLEL, Mode.PIPELINE, Mode.HYBRID])
def test_explicit_modes_are_kept_and_spread(mode):
    placement = place_request(mode, [3, 1, 0], guidance=True)
    assert placement.mode is mode
    assert placement.device == 2  # serial requests go to the least busy device, not always 0
    assert placement.pair == (1, 2)
    assert placement.devices == ((2,) if mode is Mode.SERIAL else (1, 2))


def test_board_counts_and_releases(tmp_path):
    board = InFlightBoard(tmp_path / "board.json", 2)
    assert board.loads() == [0, 0]
    with board.occupy(lambda seen: (place_request(Mode.AUTO, seen.loads, True), (0, 1))) as first:
        assert first.decision.mode is Mode.HYBRID
        assert board.loads() == [1, 1]
        with board.occupy(lambda seen: ("second", (place_request(Mode.AUTO, seen.loads, True).device,))) as second:
            assert second.decision == "second"
            assert board.loads() == [2, 1]
            first.update((1,))
            assert board.loads() == [1, 1]
        assert board.loads() == [0, 1]
    assert board.loads() == [0, 0]


def _hold(path: str, ready, release) -> None:
    board = InFlightBoard(path, 2)
    with board.occupy(lambda seen: (None, (1,))):
        ready.set()
        release.wait(10)


def test_board_is_shared_between_processes_and_forgets_dead_ones(tmp_path):
    path = str(tmp_path / "board.json")
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, release))
    holder.start()
    assert ready.wait(10)
    board = InFlightBoard(path, 2)
    assert board.loads() == [0, 1]
    os.kill(holder.pid, 9)  # dies without releasing
    holder.join()
    assert board.loads() == [0, 0]


def test_reading_the_loads_does_not_write_the_board(tmp_path):
    """An auto run reads the board before every step: a read must not rewrite the file (a write on a
    disk-backed /tmp can wait for the journal, tens of ms in the server)."""
    board = InFlightBoard(tmp_path / "board.json", 2)
    with board.occupy(lambda seen: (None, (0,))):
        before = (board.path.read_text(), board.path.stat().st_mtime_ns)
        for _ in range(3):
            assert board.loads() == [1, 0]
        assert (board.path.read_text(), board.path.stat().st_mtime_ns) == before


def test_the_server_board_lives_in_memory_where_there_is_shared_memory():
    from hybridiff.inflight import default_board_path

    path = default_board_path()
    assert path.name == f"hybridiff-load-{os.getppid()}.json"
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        assert str(path.parent) == "/dev/shm"


def test_placement_without_guidance_occupies_one_device():
    assert place_request(Mode.CFG_PARALLEL, [0, 0], guidance=False).devices == (0,)
    assert place_request(Mode.PIPELINE, [0, 0], guidance=False).devices == (0, 1)


def test_boards_of_servers_that_stopped_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from hybridiff.inflight import remove_dead_boards

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / f"hybridiff-load-{int(finished.stdout)}.json"
    live = tmp_path / f"hybridiff-load-{os.getpid()}.json"
    other = [tmp_path / "hybridiff-load-notapid.json", tmp_path / "unrelated-123.json"]
    for path in (dead, live, *other):
        path.write_text("{}")
    assert remove_dead_boards(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and all(p.exists() for p in other)


# --- what auto weighs: jobs and learned costs -----------------------------------------------------------


def test_a_job_is_recorded_with_its_devices_and_advances_with_its_steps(tmp_path):
    from hybridiff.deadline import StepSample, costs_from, view_of
    from hybridiff.inflight import Job

    clock = lambda: 100.0  # noqa: E731
    board = InFlightBoard(tmp_path / "board.json", 2, clock=clock)
    job = Job(steps_left=20, cost_key="sdxl:64x64", deadline=clock() + 3.0)

    def choose(snapshot):
        job.may_yield = True  # what the decision says is recorded with the job
        return "split", (0, 1)

    with board.occupy(choose, job) as placed:
        entry = board.snapshot().jobs[placed.key]
        assert (entry["devices"], entry["steps_left"], entry["deadline"], entry["may_yield"]) == ([0, 1], 20, 103.0,
                                                                                                 True)
        assert view_of(board.snapshot(), placed.key, "sdxl:64x64").me is None  # no cost learned yet
        placed.progress(19, True, StepSample("split", 1, wall_s=0.3, compute_s=0.2))
        placed.progress(18, True, StepSample("serial", 1, wall_s=0.5, compute_s=0.4))
        placed.update((1,))
        placed.progress(17, False, StepSample("serial", 1, wall_s=0.7, compute_s=0.4))
        seen = board.snapshot()
        assert seen.jobs[placed.key]["steps_left"] == 17 and not seen.jobs[placed.key]["may_yield"]
        assert seen.loads == [0, 1]
        assert costs_from(seen.costs["sdxl:64x64"]).step_s == pytest.approx(0.8 * 0.5 + 0.2 * 0.7)
        view = view_of(seen, placed.key, "sdxl:64x64")
        assert view.me.devices == (1,) and view.me.remaining_s == pytest.approx(17 * 0.54)
        assert view.me.deadline_s == pytest.approx(3.0) and view.others == []
    # The costs outlive the request: the next request of that size is placed by them.
    assert board.snapshot().jobs == {} and "sdxl:64x64" in board.snapshot().costs


def test_a_step_that_shared_its_device_teaches_no_solo_wall_time(tmp_path):
    from hybridiff.deadline import StepSample
    from hybridiff.inflight import Job

    board = InFlightBoard(tmp_path / "board.json", 2)
    with board.occupy(lambda snapshot: (None, (0,)), Job(20, "k")) as first:
        first.progress(19, False, StepSample("serial", 1, wall_s=0.5, compute_s=0.4))
        with board.occupy(lambda snapshot: (None, (0,)), Job(20, "k")) as second:
            second.progress(19, False, StepSample("serial", 1, wall_s=0.9, compute_s=0.4))  # waited for first
        with board.occupy(lambda snapshot: (None, (1,)), Job(20, "k")) as elsewhere:
            elsewhere.progress(19, False, StepSample("serial", 1, wall_s=0.6, compute_s=0.4))
    assert board.snapshot().costs["k"]["serial"] == pytest.approx(0.8 * 0.5 + 0.2 * 0.6)
    assert board.snapshot().costs["k"]["serial_pair"] == pytest.approx(0.9)  # what sharing with one cost


def test_only_a_device_shared_with_one_request_of_the_same_size_teaches_the_pair_cost(tmp_path):
    from hybridiff.deadline import StepSample
    from hybridiff.inflight import Job

    board = InFlightBoard(tmp_path / "board.json", 2)
    step = StepSample("serial", 1, wall_s=0.9, compute_s=0.4)
    with board.occupy(lambda snapshot: (None, (0,)), Job(20, "k")) as first:
        with board.occupy(lambda snapshot: (None, (0,)), Job(20, "other size")) as foreign:
            first.progress(19, False, step)
            with board.occupy(lambda snapshot: (None, (0,)), Job(20, "k")) as third:
                third.progress(19, False, step)  # two neighbours
            foreign.progress(19, False, step)
    assert "serial_pair" not in board.snapshot().costs["k"]
    assert "serial_pair" not in board.snapshot().costs["other size"]


def test_a_board_without_costs_is_read_and_a_broken_cost_table_resets(tmp_path):
    path = tmp_path / "board.json"
    path.write_text('{"entries": {}, "down": {}}')  # written before costs existed
    board = InFlightBoard(path, 2)
    assert board.snapshot().costs == {} and board.loads() == [0, 0]
    path.write_text('{"entries": {}, "down": {}, "costs": {"k": 3}}')
    assert board.snapshot().costs == {}


def test_a_waiting_request_holds_no_device_until_its_orchestrator_takes_its_entry_over(tmp_path):
    from hybridiff.deadline import running_from, waiting_from
    from hybridiff.inflight import Job

    clock = lambda: 100.0  # noqa: E731
    board = InFlightBoard(tmp_path / "board.json", 2, clock=clock)
    key = "a" * 32
    costs = {"sdxl:64x64": {"serial": 0.5}}
    def at_most_two(family: str):
        return lambda snapshot: "full" if snapshot.held(family) >= 2 else None

    job = Job(steps_left=20, cost_key="sdxl:64x64", deadline=104.0)
    assert board.enter_waiting(key, job, at_most_two("sdxl")) is None
    seen = board.snapshot()
    assert seen.loads == [0, 0] and board.waited_deadline(key) == 104.0
    assert waiting_from(seen.jobs, costs) == [pytest.approx(10.0)]  # its whole run, serially
    assert running_from(seen.jobs, costs, seen.now) == {}  # and it runs nowhere yet
    with board.occupy(lambda snapshot: ("serial", (1,)), Job(20, "sdxl:64x64", 104.0), key) as placed:
        seen = board.snapshot()
        assert list(seen.jobs) == [placed.key] and seen.loads == [0, 1]  # one entry: the running one
        assert board.waited_deadline(key) is None
        # A family's count holds its requests, running and waiting: one more sdxl fits, an sd3 one too.
        assert board.enter_waiting("b" * 32, Job(20, "sdxl:64x64"), at_most_two("sdxl")) is None
        assert board.enter_waiting("c" * 32, Job(20, "sdxl:64x64"), at_most_two("sdxl")) == "full"
        assert WAITING_PREFIX + "c" * 32 not in board.snapshot().jobs  # refused: not recorded
        assert board.enter_waiting("d" * 32, Job(20, "sd3:64x64"), at_most_two("sd3")) is None
        assert waiting_from(board.snapshot().jobs, {}) is None  # a size with no estimate: no numbers
        for other in ("b", "c", "d"):
            board.leave_waiting(other * 32)
        board.leave_waiting(key)  # taken over already: nothing to remove
        assert list(board.snapshot().jobs) == [placed.key]
    assert board.snapshot().jobs == {}


def test_an_arrival_is_priced_on_the_board_with_every_earlier_arrival_recorded(tmp_path):
    """The refusal is decided and the request recorded under one lock: arrivals from several processes at
    once each see the ones recorded before them, so no two are priced on the same board."""
    path = tmp_path / "board.json"
    InFlightBoard(path, 2)
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        seen = pool.starmap(_arrive, [(path, index) for index in range(8)])
    assert sorted(seen) == list(range(8))  # each saw a different number of requests ahead of it
    assert len(InFlightBoard(path, 2).snapshot().jobs) == 0  # the pool's processes are gone: entries dropped


def _arrive(path, index: int) -> int:
    from hybridiff.inflight import Job

    board = InFlightBoard(path, 2)
    seen = []
    board.enter_waiting(f"{index:032d}", Job(20, "sdxl:64x64"), lambda snapshot: seen.append(snapshot.held("sdxl")))
    return seen[0]
