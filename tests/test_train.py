"""Training tooling on the `tiny` training size: the loss falls, a resumed run equals an unbroken one, and the
result is a folder the families load with from_pretrained and sample from."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from train.components import TRAIN_SIZES
from train.stages import TRAINED_KNOBS, Hyper, export, train_denoiser, train_vae

TINY = TRAIN_SIZES["tiny"]


def _losses(log: Path) -> list[float]:
    with open(log, encoding="utf-8") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_vae_resumed_equals_unbroken(tmp_path):
    hyper = Hyper(steps=12, batch=4, lr=1e-3)
    unbroken = train_vae(TINY, "sdxl", tmp_path / "a", hyper, log_every=4)
    first = Hyper(steps=5, batch=4, lr=1e-3)
    with pytest.raises(SystemExit):  # stopped early on purpose: max_seconds=0 stops after one step
        train_vae(TINY, "sdxl", tmp_path / "b", first, max_seconds=0)
    resumed = train_vae(TINY, "sdxl", tmp_path / "b", hyper, log_every=4)
    for (name, a), b in zip(unbroken.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert unbroken.config.scaling_factor == resumed.config.scaling_factor != 1.0


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_few_steps_on_tiny_lower_the_loss_and_export_loads(tmp_path, family):
    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import Mode

    vae = train_vae(TINY, family, tmp_path, Hyper(steps=40, batch=8, lr=2e-3), log_every=10, warmup=10)
    vae_losses = _losses(tmp_path / f"vae-{family}.log.csv")
    assert vae_losses[-1] < 0.7 * vae_losses[0], vae_losses
    hyper = Hyper(steps=60, batch=8, lr=2e-3, text_lr=2e-3)
    modules, tokenizers, done = train_denoiser(family, TINY, tmp_path, vae, hyper, log_every=20, warmup=10)
    assert done == 60
    losses = _losses(tmp_path / f"{family}-denoiser.log.csv")
    assert losses[-1] < 0.95 * losses[0] and losses == sorted(losses, reverse=True), losses
    folder = export(family, tmp_path / "ckpt", tmp_path, vae, modules, tokenizers)
    assert (folder / "model_index.json").is_file()
    pipe = LocalPipeline(family, folder, devices=1)
    # The export writes the model's serving defaults: its size (here the smallest a server takes) and knobs.
    assert (pipe.defaults.height, pipe.defaults.width) == (64, 64)
    expected_window = TRAINED_KNOBS.get(family, {}).get("slope_window", pipe.family.defaults.knobs.window)
    assert pipe.defaults.knobs.window == expected_window
    side = TINY.image_size
    request = ImageRequest(seed=1, steps=4, guidance_scale=4.0, height=side, width=side, mode=Mode.SERIAL,
                           knobs=pipe.family.defaults.knobs)
    image = pipe.generate("a red circle on the left", request)[0]
    assert image.shape == (side, side, 3)


def test_serving_vae_decodes_the_same_latents_at_twice_the_side(tmp_path):
    from train.stages import train_serving_vae

    base = train_vae(TINY, "sd3", tmp_path, Hyper(steps=3, batch=4, lr=1e-3))
    served = train_serving_vae(TINY, "sd3", tmp_path, base, Hyper(steps=3, batch=4, lr=1e-3))
    assert (served.config.scaling_factor, served.config.shift_factor) == (
        base.config.scaling_factor, base.config.shift_factor)
    latents = torch.zeros(1, 16, TINY.image_size // 4, TINY.image_size // 4)
    with torch.no_grad():
        assert served.decode(latents).sample.shape[-1] == 2 * base.decode(latents).sample.shape[-1]


def test_a_share_of_training_captions_is_mislabelled_the_same_way_every_time():
    from train.data import make_batch
    from train.stages import training_captions

    _, examples = make_batch(0, 0, 400)
    truthful = [e.caption for e in examples]
    assert training_captions(examples, 0.0, 0, 7) == truthful
    noisy = training_captions(examples, 0.3, 0, 7)
    assert noisy == training_captions(examples, 0.3, 0, 7) != training_captions(examples, 0.3, 0, 8)
    wrong = sum(a != b for a, b in zip(noisy, truthful, strict=True)) / len(truthful)
    assert 0.25 < wrong < 0.35, wrong


def test_a_state_is_resumed_only_by_its_own_recipe_and_up_to_its_steps(tmp_path):
    """Resuming another recipe's state (e.g. after a change of --mislabel), or one already past --steps, would
    give a model that no unbroken run gives: refused, naming what differs."""
    from train import loop

    def attempt(recipe: dict, steps: int) -> int:
        torch.manual_seed(0)
        layer = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        return loop.run("toy", tmp_path / "toy.pt", {"layer": layer}, optimizer,
                        lambda step: layer(torch.ones(1, 2)).pow(2).sum(), steps, recipe=recipe)

    assert attempt({"mislabel": 0.3}, 3) == 3
    assert attempt({"mislabel": 0.3}, 5) == 5  # the same recipe goes on
    with pytest.raises(SystemExit, match=r"mislabel 0.3 \(asked: 0.0\)"):
        attempt({"mislabel": 0.0}, 8)
    with pytest.raises(SystemExit, match="past --steps 4"):
        attempt({"mislabel": 0.3}, 4)
