"""Request validation: every bad field is named with its allowed range (no server needed)."""

import numpy as np
import pytest

from hybridiff.params import InvalidParameter, Limits, parse_image_requests, parse_prompts
from hybridiff.schedule import Mode
from hybridiff.wire import SDXL

DEFAULTS = SDXL.defaults
LIMITS = Limits(max_height=512, max_width=512, max_steps=100, max_batch=4)


def parse(**fields):
    arrays = {k: np.array([v], dtype=object if isinstance(v, str) else None) for k, v in fields.items()}
    return parse_image_requests(arrays, DEFAULTS, LIMITS, batch=1)


def test_defaults_are_the_paper_sdxl_values():
    (request,) = parse()
    assert (request.steps, request.guidance_scale, request.mode) == (50, 5.0, Mode.AUTO)
    knobs = request.knobs
    assert (knobs.window, knobs.eps_slope, knobs.k, knobs.tau_cap) == (12, 0.4e-3, 5, 15)


def test_seeds_count_up_through_a_batch():
    requests = parse_image_requests({"SEED": np.array([10])}, DEFAULTS, LIMITS, batch=3)
    assert [r.seed for r in requests] == [10, 11, 12]


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"STEPS": 0}, r"STEPS: 0 outside the allowed range \[1, 100\]"),
        ({"STEPS": 101}, r"STEPS: 101 outside"),
        ({"HEIGHT": 100}, r"HEIGHT: 100 is not a multiple of 8"),
        ({"WIDTH": 1024}, r"WIDTH: 1024 outside the allowed range \[64, 512\]"),
        ({"HEIGHT": 32}, r"HEIGHT: 32 outside"),
        ({"MODE": "fast"}, r"MODE: unknown mode 'fast'; one of serial, cfg_parallel, pipeline, hybrid, auto"),
        ({"K": -1}, r"K: -1 outside the allowed range \[0, 100\]"),
        ({"SLOPE_WINDOW": 0}, r"SLOPE_WINDOW: 0 outside"),
        ({"EPS_SLOPE": float("nan")}, r"EPS_SLOPE: must be finite"),
        ({"TAU_CAP": -3}, r"TAU_CAP: -3 outside"),
        ({"GUIDANCE_SCALE": -1.0}, r"GUIDANCE_SCALE: -1.0 outside"),
        ({"SEED": -1}, r"SEED: -1 outside"),
        ({"STEPS": 2.5}, r"STEPS: must be an integer"),
    ],
)
def test_bad_fields_are_named_with_their_range(fields, match):
    with pytest.raises(InvalidParameter, match=match):
        parse(**fields)


def test_scalar_fields_take_one_value():
    with pytest.raises(InvalidParameter, match="STEPS: expected one value, got 2"):
        parse_image_requests({"STEPS": np.array([4, 5])}, DEFAULTS, LIMITS, batch=1)


def test_prompts():
    prompts, negatives = parse_prompts(np.array([b"a", b"b"], dtype=object), np.array([b"n"], dtype=object), LIMITS)
    assert prompts == ["a", "b"] and negatives == ["n", "n"]
    assert parse_prompts(np.array([b"a"], dtype=object), None, LIMITS) == (["a"], None)
    with pytest.raises(InvalidParameter, match="PROMPT: batch is empty"):
        parse_prompts(np.array([], dtype=object), None, LIMITS)
    with pytest.raises(InvalidParameter, match="PROMPT: 5 prompts; at most 4"):
        parse_prompts(np.array([b"a"] * 5, dtype=object), None, LIMITS)
    with pytest.raises(InvalidParameter, match="NEGATIVE_PROMPT: 2 given for 3 prompts"):
        parse_prompts(np.array([b"a"] * 3, dtype=object), np.array([b"x", b"y"], dtype=object), LIMITS)
    with pytest.raises(InvalidParameter, match="PROMPT: must be UTF-8"):
        parse_prompts(np.array([b"\xff\xfe"], dtype=object), None, LIMITS)
