"""Custom Prometheus metrics of the orchestrator, exported by Triton on its metrics port.

What users tune the schedule by: which mode requests asked for and which ran (the load-aware
choice), where tau1 and tau2 fell, and the steps and seconds spent in each phase.
"""

from __future__ import annotations

STEP_BUCKETS = [float(b) for b in (0, 5, 10, 15, 20, 25, 30, 40, 50, 75, 100, 200)]


class OrchestratorMetrics:
    def __init__(self, family: str) -> None:
        import triton_python_backend_utils as pb_utils

        self.family = family
        self.requests = pb_utils.MetricFamily(
            name="hybridiff_images_total",
            description="Images generated, by requested and executed mode",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.tau = {
            which: pb_utils.MetricFamily(
                name=f"hybridiff_{which}_step",
                description=f"Step index of {which} (hybrid schedules that found one)",
                kind=pb_utils.MetricFamily.HISTOGRAM,
            )
            for which in ("tau1", "tau2")
        }
        self.phase_steps = pb_utils.MetricFamily(
            name="hybridiff_phase_steps_total",
            description="Denoising steps run, by phase",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.phase_seconds = pb_utils.MetricFamily(
            name="hybridiff_phase_seconds_total",
            description="Wall time of denoising steps, by phase",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.failovers = pb_utils.MetricFamily(
            name="hybridiff_failovers_total",
            description="Runs moved off a denoiser device that failed, by failed device",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._metrics: dict[tuple, object] = {}

    def _metric(self, family, labels: dict[str, str], **kwargs):
        key = (id(family), tuple(sorted(labels.items())))
        if key not in self._metrics:
            self._metrics[key] = family.Metric(labels={"family": self.family, **labels}, **kwargs)
        return self._metrics[key]

    def record(self, summary: dict) -> None:
        """One image's schedule summary (the JSON the response carries)."""
        labels = {"mode_requested": summary["mode_requested"], "mode_run": summary["mode_run"]}
        self._metric(self.requests, labels).increment(1)
        for which in ("tau1", "tau2"):
            if summary.get(which) is not None:
                self._metric(self.tau[which], {}, buckets=STEP_BUCKETS).observe(float(summary[which]))
        for phase, steps in summary["phase_steps"].items():
            self._metric(self.phase_steps, {"phase": phase}).increment(steps)
        for phase, seconds in summary["phase_seconds"].items():
            self._metric(self.phase_seconds, {"phase": phase}).increment(seconds)
        for failover in summary["failover"]:
            self._metric(self.failovers, {"device": str(failover["device"])}).increment(1)
