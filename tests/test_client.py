"""What the command-line client prints about the schedule a request ran."""

from client.generate import _summary


def test_summary_reports_mode_phases_and_the_cost_of_load_checks():
    schedule = {
        "mode_run": "hybrid", "mode_requested": "auto", "tau1": 15, "tau2": 20, "tau_source": "slope",
        "phase_steps": {"partition": 45, "warmup": 1, "pipeline": 4},
        "phase_seconds": {"partition": 14.0, "warmup": 0.3, "pipeline": 0.7},
        "overhead_seconds": 0.21, "placement_seconds": 0.0035,
    }
    line = _summary(schedule)
    assert line.startswith("mode hybrid (asked auto); tau1=15 tau2=20 (slope)")
    assert "steps partition 45, warmup 1, pipeline 4" in line
    assert line.endswith("overhead 0.210s (load checks 0.0035s)")


def test_summary_reports_a_failover():
    schedule = {
        "mode_run": "serial", "mode_requested": "cfg_parallel", "tau1": None, "tau2": None, "tau_source": None,
        "phase_steps": {"partition": 3, "serial": 5}, "phase_seconds": {"partition": 1.0, "serial": 2.0},
        "overhead_seconds": 0.1, "placement_seconds": 0.0,
        "failover": [{"device": 1, "step": 3, "continued_on": 0}],
    }
    assert _summary(schedule).endswith("device 1 failed at step 3, went on on device 0")
