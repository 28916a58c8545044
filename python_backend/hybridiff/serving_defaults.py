"""A checkpoint's own serving defaults: ``serving_defaults.json`` in its folder overrides the family's.

The family's defaults (:class:`hybridiff.wire.FamilyDefaults`) suit the model the family was designed around
(SDXL at 512x512, its knobs). A checkpoint trained at another size, or whose guidance curve settles at another
pace, carries what suits it in a small JSON object keyed by the request's field names (the Python client's
keywords, e.g. ``{"height": 64, "width": 64, "eps_slope": 0.004}``). Each value is checked by the same rules a
request's value is (:mod:`hybridiff.params`), so a default is always a value a request could have sent.

Reads no weights: the orchestrator applies it without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .params import parse_input  # the request's own rules, so a default is a value a request could send
from .validation import InvalidParameter
from .wire import BYTES, FamilyDefaults, Limits, RequestInput, scalar_inputs

FILE_NAME = "serving_defaults.json"


def overridable_inputs() -> dict[str, RequestInput]:
    """Request fields whose default a checkpoint may set: those that default to a family value (not MODE, SEED)."""
    return {spec.field: spec for spec in scalar_inputs() if isinstance(spec.default, str) and spec.dtype != BYTES}


def apply_overrides(base: FamilyDefaults, overrides: Mapping[str, object], limits: Limits,
                    source: str = FILE_NAME) -> FamilyDefaults:
    """``base`` with ``overrides`` (field name -> value) applied; ValueError naming the file and field otherwise."""
    allowed = overridable_inputs()
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    top: dict[str, object] = {}
    knobs: dict[str, object] = {}
    for field, value in overrides.items():
        spec = allowed[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {field} must be a number, got {value!r}")
        if spec.python_type is int and not float(value).is_integer():
            raise ValueError(f"{source}: {field} must be an integer, got {value!r}")
        try:
            checked = parse_input(spec, np.array([value]), base, limits)
        except InvalidParameter as err:
            raise ValueError(f"{source}: {err}") from err
        target, _, attribute = spec.default.rpartition(".")
        (knobs if target == "knobs" else top)[attribute] = checked
    defaults = dataclasses.replace(base, **top, knobs=dataclasses.replace(base.knobs, **knobs))
    defaults.knobs.validate()
    return defaults


def read_serving_defaults(folder: Path, base: FamilyDefaults, limits: Limits | None = None) -> FamilyDefaults:
    """The defaults a request to the checkpoint in ``folder`` gets: the family's, with the folder's file applied."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return base
    try:
        overrides = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: expected a JSON object of field -> value, got {type(overrides).__name__}")
    return apply_overrides(base, overrides, limits or Limits(), source=str(path))


def write_serving_defaults(folder: Path, base: FamilyDefaults, overrides: Mapping[str, object],
                           limits: Limits | None = None) -> Path:
    """Check ``overrides`` as :func:`read_serving_defaults` will, then write them to ``folder``'s file."""
    path = Path(folder) / FILE_NAME
    apply_overrides(base, overrides, limits or Limits(), source=str(path))
    path.write_text(json.dumps(dict(overrides), indent=1) + "\n")
    return path
