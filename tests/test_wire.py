"""The wire definition is the one place tensors are named: every consumer derives from it."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.generate import build_inputs, request_fields
from export.make_repository import Deployment, write_repository
from hybridiff import wire
from hybridiff.params import InvalidParameter, parse_image_requests

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- wire-table:start -->", "<!-- wire-table:end -->"


def readme_table() -> str:
    text = (REPO / "README.md").read_text()
    assert START in text and END in text, "README.md lost its wire-table markers"
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_readme_request_table_is_the_wire_definition():
    assert readme_table() == wire.markdown_table(), (
        "README's request table differs from hybridiff/wire.py: paste `python -m hybridiff.wire --markdown`"
    )


NEW_INPUT = wire.RequestInput("NEW_KNOB", wire.INT64, "a knob added in one place", default=3, low=0, high=10)


@pytest.fixture
def wire_with_new_input(monkeypatch):
    monkeypatch.setattr(wire, "REQUEST_INPUTS", (*wire.REQUEST_INPUTS, NEW_INPUT))


def test_a_new_optional_input_reaches_every_consumer(wire_with_new_input, tmp_path):
    repo = write_repository(tmp_path / "r", {"sdxl": tmp_path / "ckpt"}, Deployment())
    entry = 'name: "NEW_KNOB" data_type: TYPE_INT64 dims: [ -1 ] optional: true'
    assert entry in (repo / "sdxl" / "config.pbtxt").read_text()  # the public model
    assert "new_knob" in request_fields()
    (sent,) = [i for i in build_inputs("http", ["a prompt"], new_knob=7) if i.name() == "NEW_KNOB"]
    assert sent.datatype() == "INT64"
    assert "| `NEW_KNOB` | INT64 [1] | 3 | 0 to 10 |" in wire.markdown_table()
    # Validation applies its range and default before any code uses it.
    defaults, limits = wire.SDXL.defaults, wire.Limits()
    assert parse_image_requests({}, defaults, limits, batch=1)
    with pytest.raises(InvalidParameter, match=r"NEW_KNOB: 11 outside the allowed range \[0, 10\]"):
        parse_image_requests({"NEW_KNOB": np.array([11])}, defaults, limits, batch=1)


def test_every_family_tensor_is_in_the_generated_configs(tmp_path):
    repo = write_repository(tmp_path / "r", {"sdxl": tmp_path / "a", "sd3": tmp_path / "b"}, Deployment())
    for family in wire.FAMILIES.values():
        encoder = (repo / f"{family.name}_text_encoder" / "config.pbtxt").read_text()
        denoiser = (repo / f"{family.name}_denoiser_0" / "config.pbtxt").read_text()
        for tensor in family.branch_outputs():
            assert f'name: "{tensor.name}"' in encoder
        for tensor in (*family.denoiser_inputs(), *family.denoiser_outputs()):
            assert f'name: "{tensor.name}"' in denoiser


def wire_names() -> set[str]:
    names = {spec.name for spec in wire.REQUEST_INPUTS}
    names |= {t.name for t in (wire.IMAGE, wire.SCHEDULE, wire.LATENTS, wire.SAMPLE, wire.TIMESTEP, wire.STAGE)}
    names |= {t.name for t in (wire.CAPTURE_STAGE, wire.EPS, wire.COMPUTE_SECONDS, wire.BATCHED_REQUESTS)}
    names.add(wire.REQUEST_KEY.name)
    for family in wire.FAMILIES.values():
        names |= {t.name for t in (*family.conditioning, *family.activations, *family.branch_outputs())}
    return names


def test_triton_glue_names_no_tensor_itself():
    """The models in hybridiff/triton take every tensor name from the wire definition."""
    names = wire_names()
    for path in sorted((REPO / "python_backend" / "hybridiff" / "triton").glob("*.py")):
        literals = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not literals & names, f"{path.name} spells wire names itself: {sorted(literals & names)}"


def test_the_client_and_the_wire_import_without_torch():
    code = "import sys, client.generate, hybridiff.wire; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_defaults_and_bounds_resolve_for_every_family():
    limits = wire.Limits()
    for family in wire.FAMILIES.values():
        for spec in wire.scalar_inputs():
            default = spec.default_for(family.defaults)
            low, high = spec.bounds(limits)
            if spec.choices:
                assert default in spec.choices
            else:
                assert low <= default <= high, (family.name, spec.name)
    assert dataclasses.is_dataclass(limits)
