"""Stale activations: run a denoiser so that only the modules one stage owns compute.

Family-agnostic mechanism. For one forward pass of the whole model, each named submodule is
either owned (it computes, and its output may be recorded), fed (it returns a tensor structure
given by the caller, typically another stage's output from the previous step), or bypassed (it
returns a cheap structurally valid value from a family-supplied function, because nothing this
stage computes depends on its value). After the last module the stage owns has run, the forward
is cut short. This keeps the model's own ``forward`` in charge of the wiring (skip connections,
embeddings), so the split cannot drift from what diffusers computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

Bypass = Callable[[str, torch.nn.Module, tuple, dict], Any]


class _StageFinished(Exception):
    """Raised after a stage's last module so the rest of the forward is not run."""


@dataclass(frozen=True)
class StageSplit:
    """Which submodules (by qualified name) each pipeline stage owns, in execution order.

    ``exports[s]`` are the modules whose outputs stage ``s`` hands to the other stages;
    ``imports[s]`` are the modules whose outputs stage ``s`` needs from them (stale).
    ``output_stage`` is the stage that produces the model's output.
    """

    owned: tuple[tuple[str, ...], ...]
    exports: tuple[tuple[str, ...], ...]
    output_stage: int

    @property
    def num_stages(self) -> int:
        return len(self.owned)

    def owner(self, name: str) -> int:
        for stage, names in enumerate(self.owned):
            if name in names:
                return stage
        raise KeyError(name)

    def imports(self, stage: int) -> tuple[str, ...]:
        return tuple(n for s, names in enumerate(self.exports) if s != stage for n in names)

    def all_modules(self) -> tuple[str, ...]:
        return tuple(n for names in self.owned for n in names)


@contextmanager
def _patched_forwards(model: torch.nn.Module, replacements: Mapping[str, Callable[..., Any]]):
    """Temporarily replace ``forward`` of named submodules (instance attribute shadows the class)."""
    modules = dict(model.named_modules())
    patched = []
    try:
        for name, fn in replacements.items():
            module = modules[name]
            if "forward" in module.__dict__:
                raise RuntimeError(f"module {name} already has a patched forward")
            module.forward = fn
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def run_stage(
    model: torch.nn.Module,
    forward: Callable[[], Any],
    split: StageSplit,
    stage: int | None,
    stale: Mapping[str, Any],
    bypass: Bypass,
    record: Iterable[str] = (),
) -> tuple[Any, dict[str, Any]]:
    """Run ``forward()`` (a closure calling ``model``) as stage ``stage`` of ``split``.

    ``stage=None`` runs the whole model and only records. Returns the model output (None when the
    stage does not produce it) and the recorded outputs of the modules named in ``record``.
    """
    recorded: dict[str, Any] = {}
    modules = dict(model.named_modules())
    replacements: dict[str, Callable[..., Any]] = {}
    to_record = set(record)
    last_owned = None
    if stage is not None:
        if stage == split.output_stage:
            last_owned = None
        else:
            last_owned = split.owned[stage][-1]
        missing = [n for n in split.imports(stage) if n not in stale]
        if missing:
            raise ValueError(f"stage {stage} needs stale outputs of {missing}")
        to_record |= set(split.exports[stage])

    for name in split.all_modules():
        module = modules[name]
        owned = stage is None or split.owner(name) == stage
        if owned:
            if name in to_record or name == last_owned:
                replacements[name] = _recording(module, name, recorded, name == last_owned)
        elif name in stale:
            replacements[name] = _returning(stale[name])
        else:
            replacements[name] = _bypassing(module, name, bypass)

    output = None
    with _patched_forwards(model, replacements):
        try:
            output = forward()
        except _StageFinished:
            output = None
    return output, recorded


def _recording(module: torch.nn.Module, name: str, recorded: dict[str, Any], finish: bool):
    original = type(module).forward

    def forward(*args, **kwargs):
        out = original(module, *args, **kwargs)
        recorded[name] = out
        if finish:
            raise _StageFinished
        return out

    return forward


def _returning(value: Any):
    def forward(*args, **kwargs):
        return value

    return forward


def _bypassing(module: torch.nn.Module, name: str, bypass: Bypass):
    def forward(*args, **kwargs):
        return bypass(name, module, args, kwargs)

    return forward
