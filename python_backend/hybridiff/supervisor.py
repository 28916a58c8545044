"""Bring back a model whose Python stub died, and keep readiness truthful until it is back.

Triton 2.51's Python backend no longer restarts a dead stub: every later request to that model
fails with INTERNAL "Stub process ... is not healthy" while its ready endpoint still says 200. The
supervisor watches tritonserver's children: each ``triton_python_backend_stub`` names its model's
``model.py`` (``<repository>/<model>/<version>/model.py``) and its instance on its command line,
and a killed stub stays a zombie (Triton does not reap it). When any stub of a model is gone, the
supervisor unloads the model (its ready endpoint then answers 400 until it is loaded again, and
new requests fail fast with "not ready" instead of reaching the dead process), then loads it
again through the repository API with the admin key. Unload first: Triton 2.51 ignores a load of a
model that is loaded with an unchanged configuration, dead stub or not. A load that fails is
retried with a bounded back-off; the model stays unloaded (not ready) meanwhile.

The supervisor learns each stub's pid by scanning, so a stub that died before the first scan would
never be seen: the first scan therefore also takes a census, comparing the live stubs of every
ready Python model with the instances its configuration asks for, and treats a model short of
stubs as dead.

Decisions are plain functions (``parse_stub``, ``dead_models``, ``short_models``,
``configured_instances``, ``retry_delay``); ``Supervisor`` is the loop around them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hybridiff.admin import ADMIN_HEADER

STUB_NAME = "triton_python_backend_stub"
SHM_PREFIX = "triton_python_backend_shm_region_"
# The backend's stub arguments (python_backend r24.10, stub_launcher.cc): model.py path, shared-memory
# region, its default and growth sizes, the server's pid, the backend dir, the IPC handle, the
# instance name, the execution environment.
_ARG_MODEL_PATH, _ARG_SHM_REGION, _ARG_INSTANCE = 1, 2, 8


@dataclass(frozen=True)
class Stub:
    """One live stub process: which model instance it runs and the shared memory it was given."""

    pid: int
    model: str
    instance: str
    shm_region: str


def parse_stub(pid: int, argv: Sequence[str]) -> Stub | None:
    """The stub a command line describes, or None when it is not a Python-backend stub."""
    if len(argv) <= _ARG_INSTANCE or Path(argv[0]).name != STUB_NAME:
        return None
    model_py = Path(argv[_ARG_MODEL_PATH])
    if model_py.suffix != ".py" or len(model_py.parts) < 3:
        return None
    model = model_py.parent.parent.name  # <repository>/<model>/<version>/model.py
    return Stub(pid, model, argv[_ARG_INSTANCE], argv[_ARG_SHM_REGION])


def _stat(proc: Path) -> tuple[str, int] | None:
    """(state letter, parent pid) of a /proc/<pid> entry, or None if it is gone."""
    try:
        # The command name in parentheses may hold spaces: the fields start after the last ")".
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def scan_stubs(server_pid: int, proc_root: Path = Path("/proc")) -> dict[int, Stub]:
    """The live (not zombie) stub children of ``server_pid``, by pid."""
    stubs: dict[int, Stub] = {}
    for proc in proc_root.glob("[0-9]*"):
        stat = _stat(proc)
        if stat is None or stat[1] != server_pid or stat[0] in ("Z", "X"):
            continue
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")[:-1]]
        except OSError:
            continue
        stub = parse_stub(int(proc.name), argv)
        if stub is not None:
            stubs[stub.pid] = stub
    return stubs


def group_by_model(stubs: Mapping[int, Stub]) -> dict[str, frozenset[int]]:
    """Model name -> pids of its stubs."""
    models: dict[str, set[int]] = {}
    for stub in stubs.values():
        models.setdefault(stub.model, set()).add(stub.pid)
    return {model: frozenset(pids) for model, pids in models.items()}


def dead_models(watched: Mapping[str, Collection[int]], live_pids: Collection[int]) -> list[str]:
    """Models with at least one watched stub no longer alive, sorted.

    One dead instance is enough: Triton keeps sending requests to it, and as it fails them at once
    it is the idlest instance, so it would draw most of the traffic.
    """
    live = set(live_pids)
    return sorted(model for model, pids in watched.items() if any(pid not in live for pid in pids))


def configured_instances(config: Mapping) -> int:
    """Stubs a model's configuration (Triton's JSON form) starts: 0 unless it is a Python model.

    Triton starts ``count`` instances per listed GPU of a KIND_GPU group, ``count`` otherwise."""
    if config.get("backend") != "python":
        return 0
    total = 0
    for group in config.get("instance_group", []):
        count = int(group.get("count", 1))
        gpus = group.get("gpus") or []
        total += count * len(gpus) if group.get("kind") == "KIND_GPU" and gpus else count
    return total


def short_models(expected: Mapping[str, int], live: Mapping[str, Collection[int]]) -> list[str]:
    """Models with fewer live stubs than their configuration starts, sorted (their missing stubs died
    before anyone watched them)."""
    return sorted(model for model, count in expected.items() if len(live.get(model, ())) < count)


def retry_delay(failures: int, base_s: float = 1.0, cap_s: float = 30.0) -> float:
    """Seconds to wait before the next load after ``failures`` failed ones: 0, then doubling to a cap."""
    if failures <= 0:
        return 0.0
    return min(cap_s, base_s * 2 ** (failures - 1))


class RepositoryClient:
    """Triton's model-repository API over HTTP, with the admin key."""

    def __init__(self, http_url: str, admin_key: str, load_timeout_s: float = 600.0) -> None:
        self.base = f"http://{http_url}"
        self.admin_key = admin_key
        self.load_timeout_s = load_timeout_s

    def _post(self, path: str, timeout_s: float, body: bytes = b"") -> tuple[int, str]:
        request = urllib.request.Request(f"{self.base}{path}", method="POST", data=body)
        request.add_header(ADMIN_HEADER, self.admin_key)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def unload(self, model: str) -> tuple[int, str]:
        return self._post(f"/v2/repository/models/{model}/unload", 30.0)

    def load(self, model: str) -> tuple[int, str]:
        """Blocks until the model is loaded (or failed to load)."""
        return self._post(f"/v2/repository/models/{model}/load", self.load_timeout_s)

    def expected_stubs(self) -> dict[str, int]:
        """Ready models and how many stubs each should have (from the index and each model's configuration)."""
        status, body = self._post("/v2/repository/index", 30.0, b'{"ready": true}')
        if status != 200:
            raise ConnectionError(f"repository index answered {status}: {body.strip()}")
        expected = {}
        for entry in json.loads(body):
            with urllib.request.urlopen(f"{self.base}/v2/models/{entry['name']}/config", timeout=30) as response:
                count = configured_instances(json.loads(response.read()))
            if count:
                expected[entry["name"]] = count
        return expected

    def is_ready(self, model: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/v2/models/{model}/ready", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


@dataclass
class Recovery:
    """One dead model and what the supervisor did about it (times from ``time.monotonic``)."""

    model: str
    instances: list[str]  # the instances whose stubs died
    detected_at: float
    unloaded_at: float | None = None
    loaded_at: float | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        """From detection to the model loaded again."""
        return None if self.loaded_at is None else self.loaded_at - self.detected_at


class Supervisor:
    """Watch tritonserver ``server_pid``'s stubs; unload and reload any model that loses one.

    ``run`` polls every ``poll_s`` until ``stop`` is set; ``start``/``stop`` run it in a thread.
    Recoveries are done one model at a time, in the polling thread (a load of the small models
    takes seconds; several dead models are all unloaded first, so readiness is truthful for all).
    """

    def __init__(
        self,
        server_pid: int,
        http_url: str,
        admin_key: str,
        *,
        poll_s: float = 0.5,
        log: Callable[[str], None] | None = None,
        proc_root: Path = Path("/proc"),
        shm_dir: Path = Path("/dev/shm"),
    ) -> None:
        self.server_pid = server_pid
        self.repository = RepositoryClient(http_url, admin_key)
        self.poll_s = poll_s
        self.log = log or (lambda line: print(f"[supervisor] {line}", file=sys.stderr, flush=True))
        self.proc_root = proc_root
        self.shm_dir = shm_dir
        self.watched: dict[str, dict[int, Stub]] = {}
        self.pending: dict[str, Recovery] = {}  # dead models not loaded again yet
        self.next_attempt: dict[str, float] = {}
        self.history: list[Recovery] = []
        # Stubs of a model that was unloaded: the survivors of a partly dead model exit some time after
        # the unload (or after the new stubs start); they must not be watched as the new ones.
        self.retired: set[int] = set()
        self.census_done = False  # the first scan's check against the configured instance counts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- one poll ---------------------------------------------------------------------------------

    def _watch_new(self, live: Mapping[int, Stub]) -> None:
        """Start watching models whose stubs appeared (server start, or a model loaded later)."""
        self.retired &= set(live)  # forget the pids that are gone (a pid may be reused later)
        for model, pids in group_by_model(live).items():
            fresh = pids - self.retired
            if fresh and model not in self.watched and model not in self.pending:
                self.watched[model] = {pid: live[pid] for pid in fresh}

    def poll_once(self) -> list[str]:
        """Detect dead models, make them not ready, try to load the due ones; return the models found dead."""
        if self._stop.is_set():  # the server is shutting down: its stubs go, nothing is to be reloaded
            return []
        live = scan_stubs(self.server_pid, self.proc_root)
        dead = dead_models({m: set(s) for m, s in self.watched.items()}, live)
        now = time.monotonic()
        for model in dead:
            stubs = self.watched.pop(model)
            self._take_down(model, [stub for pid, stub in stubs.items() if pid not in live], stubs, now)
        if not self.census_done:
            dead += self._census(live, now)
        for model in sorted(self.pending):
            if self._stop.is_set() or time.monotonic() < self.next_attempt[model]:
                continue
            self._load(model)
        self._watch_new(scan_stubs(self.server_pid, self.proc_root))
        return dead

    def _take_down(self, model: str, lost: Sequence[Stub], stubs: Collection[int], now: float) -> None:
        """Unload a model that lost stubs (readiness then says so) and queue its load."""
        self.retired |= set(stubs)
        recovery = Recovery(model, sorted(s.instance for s in lost), now)
        what = ", ".join(f"{s.instance} (pid {s.pid})" for s in lost) or "of an instance (gone before the first scan)"
        self.log(f"{model}: stub {what} died; unloading")
        status, body = self.repository.unload(model)
        if status == 200:
            recovery.unloaded_at = time.monotonic()
        else:
            recovery.errors.append(f"unload {status}: {body.strip()}")
            self.log(f"{model}: unload answered {status}: {body.strip()}")
        self._unlink_regions(lost)
        with self._lock:
            self.pending[model] = recovery
        self.next_attempt[model] = now

    def _census(self, live: Mapping[int, Stub], now: float) -> list[str]:
        """Once: models short of the stubs their configuration starts; they are taken down like dead ones."""
        try:
            expected = self.repository.expected_stubs()
        except (OSError, ValueError, KeyError) as err:  # retried at the next poll
            self.log(f"census of the configured instances failed: {err}; retrying")
            return []
        self.census_done = True
        by_model = group_by_model(live)
        short = [m for m in short_models(expected, by_model) if m not in self.pending]
        self.log(f"census: {len(expected)} Python models, {sum(expected.values())} stubs configured; "
                 f"short of stubs: {', '.join(short) or 'none'}")
        for model in short:
            self.watched.pop(model, None)
            self._take_down(model, [], by_model.get(model, frozenset()), now)
        return short

    def _load(self, model: str) -> None:
        recovery = self.pending[model]
        recovery.attempts += 1
        try:
            status, body = self.repository.load(model)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            status, body = 0, str(err)
        if status == 200:
            recovery.loaded_at = time.monotonic()
            with self._lock:
                del self.pending[model]
                self.history.append(recovery)
            self.log(f"{model}: loaded again {recovery.seconds:.1f} s after its stub died was seen")
            return
        delay = retry_delay(recovery.attempts)
        recovery.errors.append(f"load {status}: {body.strip()}")
        self.next_attempt[model] = time.monotonic() + delay
        self.log(f"{model}: load attempt {recovery.attempts} answered {status}: {body.strip()}; retry in {delay:.0f} s")

    def _unlink_regions(self, stubs: Sequence[Stub]) -> None:
        """A killed stub never unlinks its shared-memory region; Triton does not either. Without this,
        every fault would leave the region (16 MiB or more) in /dev/shm for good."""
        for stub in stubs:
            if stub.shm_region.startswith(SHM_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(self.shm_dir / stub.shm_region)

    # --- loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Poll until ``stop``; a failing poll is logged, never fatal."""
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as err:  # keep supervising whatever one poll hit
                self.log(f"poll failed: {type(err).__name__}: {err}")
            self._stop.wait(self.poll_s)

    def start(self) -> Supervisor:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="hybridiff-supervisor", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Stop after the current step, without waiting (safe in a signal handler)."""
        self._stop.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop and wait for the thread (at most ``timeout_s``: a load under way is not interrupted)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def recoveries(self) -> list[Recovery]:
        """Finished recoveries so far (a copy, safe to read from another thread)."""
        with self._lock:
            return list(self.history)

    def is_recovering(self) -> bool:
        with self._lock:
            return bool(self.pending)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launcher dies, so no server outlives it (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_ready(http_url: str, process: subprocess.Popen[bytes], stop: threading.Event) -> bool:
    """Poll ``/v2/health/ready`` until 200; False if the server exits or ``stop`` is set first."""
    while not stop.is_set() and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        stop.wait(0.5)
    return False


def run_supervised(cmd: Sequence[str], env: Mapping[str, str], http_url: str, admin_key: str) -> int:
    """Run tritonserver as a child and supervise its stubs until it exits; return its exit code.

    The launcher stays the parent (not a separate process) because the stubs are tritonserver's
    children: the parent knows the server's pid without searching, dies with it, and is the one
    process that ``make``/Docker/the terminal signals. The server runs in its own session, so a
    terminal's Ctrl-C reaches it once, forwarded from here; SIGTERM and SIGINT are forwarded.
    """
    process = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True, preexec_fn=_die_with_parent)
    stop = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        stop.set()
        supervisor.request_stop()  # the stubs are about to go; they must not be reloaded
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    supervisor = Supervisor(process.pid, http_url, admin_key)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)

    def supervise() -> None:
        if _wait_ready(http_url, process, stop):
            supervisor.log(f"watching the stubs of tritonserver (pid {process.pid})")
            supervisor.start()

    watcher = threading.Thread(target=supervise, name="hybridiff-wait-ready", daemon=True)
    watcher.start()
    code = process.wait()
    stop.set()
    supervisor.stop()
    return code
