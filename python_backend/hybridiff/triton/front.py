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
:mod:`.bls`). The orchestrator validates; the front refuses nothing. The client's cancel, which Triton 2.51
does not pass on to a BLS call, is polled here and marked for the orchestrator (``CancelMark``). The front's
own death still loses its one request (INTERNAL "not healthy", which the project's client retries).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import numpy as np

from .. import wire
from ..inflight import CancelMark
from ..outage import ModelGone, OutagePolicy, StillGone, call_through_outage, record_try, with_tries
from .bls import RunStopped, bls_exec, check_request, config_parameters, model_gone, public_error_response

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

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._execute_one(r) for r in requests)))

    async def _execute_one(self, request):
        started = time.monotonic()
        timeout_us = request.timeout()
        deadline = started + timeout_us / 1e6 if timeout_us else None
        key = uuid.uuid4().hex
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
