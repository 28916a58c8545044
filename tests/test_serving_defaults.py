"""A checkpoint's serving_defaults.json: it overrides the family's defaults, every request path uses it, and a bad
file is refused at load with the file and field named (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hybridiff.families import get_family
from hybridiff.params import parse_image_requests
from hybridiff.serving_defaults import FILE_NAME, overridable_inputs, read_serving_defaults, write_serving_defaults
from hybridiff.wire import SD3, SDXL, Limits

MODELS = Path(__file__).resolve().parents[1] / "models"


def write(folder: Path, values: object) -> Path:
    (folder / FILE_NAME).write_text(json.dumps(values))
    return folder


def test_no_file_means_the_family_defaults(tmp_path):
    assert read_serving_defaults(tmp_path, SDXL.defaults) == SDXL.defaults


def test_file_overrides_size_guidance_and_knobs_and_keeps_the_rest(tmp_path):
    write(tmp_path, {"height": 64, "width": 64, "guidance_scale": 3.5, "slope_window": 4, "eps_slope": 0.002,
                     "tau_cap": 20})
    defaults = read_serving_defaults(tmp_path, SDXL.defaults)
    assert (defaults.height, defaults.width, defaults.guidance_scale, defaults.steps) == (64, 64, 3.5, 50)
    knobs = defaults.knobs
    assert (knobs.window, knobs.eps_slope, knobs.tau_cap, knobs.k, knobs.pipeline_warmup) == (4, 0.002, 20, 5, 1)


def test_a_request_that_leaves_fields_out_gets_the_checkpoints_defaults(tmp_path):
    write(tmp_path, {"height": 64, "width": 64, "k": 10})
    defaults = read_serving_defaults(tmp_path, get_family("sdxl").defaults)
    (request,) = parse_image_requests({}, defaults, Limits(), batch=1)
    assert (request.height, request.width, request.knobs.k) == (64, 64, 10)
    (asked,) = parse_image_requests({"HEIGHT": np.array([128]), "K": np.array([0])}, defaults, Limits(), batch=1)
    assert (asked.height, asked.width, asked.knobs.k) == (128, 64, 0)  # what a request sends still wins


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"height": 60}, "HEIGHT.*multiple of 8"),
        ({"height": 32}, "HEIGHT.*outside the allowed range"),
        ({"steps": 1000}, "STEPS.*outside the allowed range"),
        ({"eps_slope": -1.0}, "EPS_SLOPE.*outside"),
        ({"k": 2.5}, "k must be an integer"),
        ({"k": "5"}, "k must be a number"),
        ({"guidance_scale": True}, "guidance_scale must be a number"),
        ({"mode": "hybrid"}, "unknown field.*mode.*allowed: steps"),
        ({"window": 4}, "unknown field.*window"),
        ([64, 64], "expected a JSON object"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_field(tmp_path, values, message):
    write(tmp_path, values)
    with pytest.raises(ValueError, match=message) as err:
        read_serving_defaults(tmp_path, SDXL.defaults)
    assert FILE_NAME in str(err.value)


def test_the_deployments_limits_bound_a_default(tmp_path):
    write(tmp_path, {"steps": 150})
    assert read_serving_defaults(tmp_path, SD3.defaults).steps == 150
    with pytest.raises(ValueError, match="STEPS"):
        read_serving_defaults(tmp_path, SD3.defaults, Limits(max_steps=100))


def test_invalid_json_is_refused(tmp_path):
    (tmp_path / FILE_NAME).write_text("{height: 64")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_serving_defaults(tmp_path, SDXL.defaults)


def test_write_checks_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        write_serving_defaults(tmp_path, SDXL.defaults, {"colour": 1})
    assert not (tmp_path / FILE_NAME).exists()
    write_serving_defaults(tmp_path, SDXL.defaults, {"height": 64, "width": 64})
    assert read_serving_defaults(tmp_path, SDXL.defaults).height == 64


def test_only_fields_with_a_family_default_are_overridable():
    assert set(overridable_inputs()) == {"steps", "guidance_scale", "height", "width", "slope_window", "eps_slope",
                                         "k", "tau_cap", "pipeline_warmup"}


def test_the_committed_trained_sdxl_model_carries_its_64px_defaults():
    defaults = read_serving_defaults(MODELS / "sdxl-shapes", get_family("sdxl").defaults)
    assert (defaults.height, defaults.width) == (64, 64)
    assert defaults != SDXL.defaults
