"""Triton model ``<family>``, the public model: a thin front that hands each request to ``<family>_orchestrator``
and outlives that model's death.

Why a front: a Python model's request dies with its stub process (Triton answers it INTERNAL "Stub process
... is not healthy"; nothing on the server can answer for a dead process), and the orchestrator is the
process most likely to die: it holds torch, the run's tensors and the stale activations. So the client's
request is held here, by a process that only passes it on (no torch: quick to load, small), and when the
orchestrator's process dies with it, the front waits for the supervisor to bring the orchestrator back and
sends the request again from the start (the seed fixes the image), until it is answered or the request's
timeout (without one, ``OutagePolicy.default_wait_s``) has passed; then the client gets a retryable
UNAVAILABLE naming the orchestrator. Each image's ``SCHEDULE`` lists the failed tries (``resubmitted``).

Everything else passes through: the request's inputs as sent, its time left as the BLS request's timeout
(the orchestrator's deadline), the orchestrator's outputs, and its errors with their codes (which BLS loses:
:mod:`.bls`). The orchestrator validates. The front admits: it has an instance for every request the family may
hold and spare ones, so it sees each request on arrival, refuses at once one that could not finish within its
timeout behind those held (:func:`hybridiff.deadline.arrival_refusal`) or one beyond the count, and records
the rest on the in-flight board as waiting, with the deadline the orchestrator keeps (docs/overload.md).

The client's cancel, which Triton 2.51 does not pass on to a BLS call, is polled here and marked for the
orchestrator (``CancelMark``). The front's own death still loses its one request (INTERNAL "not healthy",
which the project's client retries).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import numpy as np

from .. import wire
from ..admission import FULL
from ..deadline import arrival_refusal, costs_from, running_from, waiting_from
from ..inflight import CancelMark, InFlightBoard, Job, Snapshot, default_board_path
from ..outage import ModelGone, OutagePolicy, StillGone, call_through_outage, record_try, with_tries
from ..serving_defaults import read_serving_defaults
from ..validation import InvalidParameter
from ..wire import FAMILIES, Limits
from .bls import (
    RunStopped,
    bls_exec,
    check_request,
    config_parameters,
    image_requests_of,
    model_gone,
    public_error_response,
    resolve_checkpoint,
)

# How often a request waiting for the orchestrator asks Triton whether its client cancelled. A cancel reaches
# the orchestrator this much later (then it stops before its next step); each poll is one call to the server.
CANCEL_POLL_S = 0.02


class OrchestratorError(RuntimeError):
    """The orchestrator answered an error (its code restored): the client gets it as it is."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = config_parameters(json.loads(args["model_config"]))
        self.family, self.orchestrator = params["family"], params["orchestrator"]
        self.outage = OutagePolicy()
        # What admission on arrival needs: the request's work (parsed by the orchestrator's rules, with the
        # checkpoint's defaults) and the in-flight board the orchestrators keep.
        self.limits = Limits.from_parameters(params)
        checkpoint = resolve_checkpoint(params["checkpoint"], args["model_repository"])
        self.defaults = read_serving_defaults(checkpoint, FAMILIES[self.family].defaults, self.limits)
        self.slots = int(params["orchestrator_instances"])
        queue_size = int(params.get("queue_size", "0"))
        self.hold_limit = self.slots + queue_size if queue_size else 0  # 0: unbounded, as Triton's queue
        self.admit_by_deadline = params.get("admit_by_deadline", "1") == "1"
        self.board = InFlightBoard(default_board_path(), int(params["devices"]))

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._execute_one(r) for r in requests)))

    async def _execute_one(self, request):
        started = time.monotonic()
        timeout_us = request.timeout()
        deadline = started + timeout_us / 1e6 if timeout_us else None
        key = uuid.uuid4().hex
        job = self._job(request, deadline)
        if job is None:  # inputs the orchestrator will refuse, naming the field
            return await self._forward(request, key, started, deadline)
        # Priced and, if admitted, put on the board as waiting in one step, so that arrivals see each other;
        # later arrivals count its work until an orchestrator places it (and takes the entry over).
        refused = self.board.enter_waiting(key, job, lambda snapshot: self._refusal(job, snapshot))
        if refused is not None:
            return public_error_response(refused, "UNAVAILABLE")
        try:
            return await self._forward(request, key, started, deadline)
        finally:
            self.board.leave_waiting(key)

    def _job(self, request, deadline: float | None) -> Job | None:
        """The request's work as the board records it, or None when its inputs do not parse (the
        orchestrator then answers the error)."""
        try:
            images = image_requests_of(request, self.defaults, self.limits)
        except InvalidParameter:
            return None
        first = images[0]
        board_deadline = None if deadline is None else self.board.clock() + deadline - time.monotonic()
        return Job(sum(i.steps for i in images), f"{self.family}:{first.height}x{first.width}", board_deadline)

    def _refusal(self, job: Job, snapshot: Snapshot) -> str | None:
        """Why the request is refused on arrival, on the board as ``snapshot`` shows it, or None: the family
        holds as many requests as it may, or the request could not finish within its timeout behind them
        (:func:`hybridiff.deadline.arrival_refusal`)."""
        held = snapshot.held(self.family)
        if self.hold_limit and held >= self.hold_limit:
            return f"{FULL}: it holds {held} {self.family} requests, running and queued, as many as it may; retry later"
        if not self.admit_by_deadline or job.deadline is None:
            return None
        running = running_from(snapshot.jobs, snapshot.costs, snapshot.now)
        waiting = waiting_from(snapshot.jobs, snapshot.costs)
        costs = costs_from(snapshot.costs.get(job.cost_key))
        if running is None or waiting is None or costs is None:
            return None  # a size with no measured step yet: the orchestrator's placement decides
        own_s = costs.seconds(job.steps_left, 1)
        return arrival_refusal(own_s, job.deadline - snapshot.now, list(running.values()), waiting, costs,
                               sum(snapshot.up), self.slots)

    async def _forward(self, request, key: str, started: float, deadline: float | None):
        """The orchestrator's answer to the request, sent again through its outages."""
        mark = CancelMark(key)
        inputs = [*request.inputs(), self.pb.Tensor(wire.REQUEST_KEY.name, np.array([key.encode()], dtype=np.object_))]
        outputs = list(request.requested_output_names()) or [t.name for t in wire.RESPONSE_OUTPUTS]
        tries: list[dict] = []

        async def submit():
            # The time left goes with the request (at least 1 us: 0 would mean no deadline at all).
            kwargs = {} if deadline is None else {"timeout": max(1, int((deadline - time.monotonic()) * 1e6))}
            call = self.pb.InferenceRequest(
                model_name=self.orchestrator, inputs=inputs, requested_output_names=outputs, **kwargs
            )
            reply, code, message, ours = await self._await(call, request, mark)
            if reply is not None:
                return reply
            if model_gone(self.orchestrator, code, message, ours):
                raise ModelGone(self.orchestrator, message)
            raise OrchestratorError(code, message)

        def on_gone(gone: ModelGone) -> None:
            if not tries:
                self.pb.Logger.log_warn(
                    f"{self.family}: {self.orchestrator} is gone ({gone.reason.strip()}); "
                    "the request is sent again once it is back"
                )
            record_try(tries, gone.reason.strip(), time.monotonic() - started)

        try:
            reply = await call_through_outage(
                submit, self.outage, deadline=deadline, on_gone=on_gone,
                check_cancelled=lambda: check_request(request.is_cancelled, None, "sending it again"),
            )
        except OrchestratorError as err:
            return public_error_response(str(err), err.code)
        except StillGone as err:
            return public_error_response(str(err), "UNAVAILABLE")
        except RunStopped as err:
            return public_error_response(str(err), err.code)
        finally:
            mark.clear()
        return self.pb.InferenceResponse(output_tensors=self._outputs(reply, outputs, tries))

    async def _await(self, call, request, mark: CancelMark):
        """The orchestrator's answer to ``call``, marking the request cancelled once its client cancels.

        The answer is still awaited after a cancel (the orchestrator stops before its next step): this
        instance takes no other request while its orchestrator call runs, as the orchestrator's instance
        count assumes."""
        answer = asyncio.ensure_future(bls_exec(self.pb, call))
        marked = False
        while not answer.done():
            await asyncio.wait({answer}, timeout=CANCEL_POLL_S)
            if not marked and not answer.done() and request.is_cancelled():
                mark.set()
                marked = True
        return answer.result()

    def _outputs(self, reply, outputs: list[str], tries: list[dict]) -> list:
        """The orchestrator's outputs as they are, each schedule with the failed tries added."""
        tensors = []
        for name in outputs:
            tensor = self.pb.get_output_tensor_by_name(reply, name)
            if tensor is not None and name == wire.SCHEDULE.name:
                schedules = with_tries(tensor.as_numpy().reshape(-1), tries)
                tensor = self.pb.Tensor(name, np.array(schedules, dtype=np.object_))
            if tensor is not None:
                tensors.append(tensor)
        return tensors
