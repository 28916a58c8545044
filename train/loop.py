"""The training harness every stage shares: resumable state, EMA, warm-up, progress bar and loss log.

Why one harness: the VAE, the U-Net and the transformer differ only in what one step computes. Each step's data and
noise come from (seed, step) alone, so a run stopped and resumed from its last saved state continues exactly as if
it had never stopped (up to the steps since that save, which are redone).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

StepFn = Callable[[int], torch.Tensor]  # step -> scalar loss (with grad)


class Ema:
    """Exponential moving average of a module's weights, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.shadow.buffers(), module.buffers(), strict=True):
            ema_b.copy_(b)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step (noise, timesteps, caption dropout): a function of (seed, step) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_resumable(name: str, state_path: Path, state: dict, recipe: dict | None, total_steps: int) -> None:
    """Refuse a saved state that this run cannot continue into what an unbroken run would give."""
    saved = state.get("recipe")
    if recipe is not None and saved is not None and saved != recipe:
        differ = ", ".join(f"{k} {saved.get(k)!r} (asked: {recipe.get(k)!r})"
                           for k in sorted(set(saved) | set(recipe)) if saved.get(k) != recipe.get(k))
        raise SystemExit(f"{name}: {state_path} was trained with another recipe: {differ}; "
                         "use another --state, or remove it to start again")
    if state["step"] > total_steps:
        raise SystemExit(f"{name}: {state_path} is at step {state['step']}, past --steps {total_steps}: it cannot "
                         "give the model of that step; use another --state")


def run(
    name: str,
    state_path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    step_fn: StepFn,
    total_steps: int,
    emas: dict[str, Ema] | None = None,
    warmup: int = 100,
    grad_clip: float = 1.0,
    checkpoint_seconds: float = 180.0,
    max_seconds: float | None = None,
    log_every: int = 50,
    recipe: dict | None = None,
) -> int:
    """Train until ``total_steps`` (or ``max_seconds`` this call); returns the steps done so far in all.

    State (weights, EMA, optimizer, step) goes to ``state_path`` every ``checkpoint_seconds`` and at the end; the
    loss log to ``state_path`` with suffix ``.log.csv`` (step, loss averaged since the previous line, seconds).
    ``recipe`` (what the steps depend on besides their number) is saved with the state; a state is resumed only
    by the same recipe and only up to ``total_steps``, so a resumed run always equals an unbroken one.
    """
    emas = emas or {}
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        check_resumable(name, state_path, state, recipe, total_steps)
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        for key, ema in emas.items():
            ema.shadow.load_state_dict(state["emas"][key])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"{name}: resumed from {state_path} at step {step}", file=sys.stderr)
    if step >= total_steps:
        return step

    def save() -> None:
        _save_atomic(
            {
                "step": step,
                "recipe": recipe,
                "modules": {k: m.state_dict() for k, m in modules.items()},
                "emas": {k: e.shadow.state_dict() for k, e in emas.items()},
                "optimizer": optimizer.state_dict(),
            },
            state_path,
        )

    state_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = state_path.with_suffix(".log.csv")
    new_log = not log_path.is_file()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    for module in modules.values():
        module.train()
    start = last_save = time.monotonic()
    losses: list[float] = []
    with open(log_path, "a", encoding="utf-8") as log, tqdm(
        total=total_steps, initial=step, desc=name, file=sys.stderr, mininterval=10, dynamic_ncols=True
    ) as bar:
        if new_log:
            log.write("step,loss,seconds\n")
        while step < total_steps:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * min(1.0, (step + 1) / warmup)
            loss = step_fn(step)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            for key, ema in emas.items():
                ema.update(modules[key], step)
            step += 1
            losses.append(loss.item())
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                mean = sum(losses) / len(losses)
                log.write(f"{step},{mean:.6f},{time.monotonic() - start:.1f}\n")
                log.flush()
                bar.set_postfix(loss=f"{mean:.4f}")
                losses.clear()
            now = time.monotonic()
            if now - last_save >= checkpoint_seconds:
                save()
                last_save = now
            if max_seconds is not None and now - start >= max_seconds:
                break
    save()
    return step
