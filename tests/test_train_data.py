"""The procedural shape data and its analytic prompt-adherence scorer."""

from __future__ import annotations

import numpy as np
import pytest

from train.data import (
    ALL_COMBINATIONS,
    COLOURS,
    HELD_OUT,
    HELD_OUT_COMBINATIONS,
    POSITIONS,
    SHAPES,
    TRAIN_COMBINATIONS,
    draw,
    make_batch,
    make_example,
    mislabel,
)
from train.score import NONE, parse_caption, read_image, score


def test_same_seed_same_pictures_other_seed_other_pictures():
    a, ea = make_batch(seed=3, start=10, count=8)
    b, eb = make_batch(seed=3, start=10, count=8)
    c, _ = make_batch(seed=4, start=10, count=8)
    assert np.array_equal(a, b) and [e.caption for e in ea] == [e.caption for e in eb]
    assert not np.array_equal(a, c)
    assert a.shape == (8, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_held_out_combinations_never_in_training_yet_each_word_is():
    assert set(HELD_OUT_COMBINATIONS).isdisjoint(TRAIN_COMBINATIONS)
    assert len(TRAIN_COMBINATIONS) + len(HELD_OUT_COMBINATIONS) == len(ALL_COMBINATIONS) == 60
    seen = {make_example(0, i).caption for i in range(2000)}
    assert not seen & {f"a {c} {s} {p}" for c, s, p in HELD_OUT_COMBINATIONS}
    for words, column in ((COLOURS, 0), (SHAPES, 1), (POSITIONS, 2)):
        assert {combo[column] for combo in TRAIN_COMBINATIONS} == set(words)


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_agrees_with_the_generator_on_fresh_images(size):
    """>= 98% per attribute on images the scorer was not tuned on (a seed used nowhere else)."""
    examples = [make_example(20261123, i, size, ALL_COMBINATIONS) for i in range(600)]
    as_uint8 = [(e.image * 255).round().astype(np.uint8) for e in examples]
    result = score(as_uint8, [e.caption for e in examples])
    for attribute in ("colour", "shape", "position"):
        assert result[attribute] >= 0.98, (attribute, result)


def test_scorer_rejects_wrong_captions_and_empty_images():
    rng = np.random.default_rng(0)
    image = draw("red", "square", "on the left", 32, rng)
    assert read_image(image).as_dict() == {"colour": "red", "shape": "square", "position": "on the left"}
    assert score([image], ["a blue triangle on the right"]) == {
        "colour": 0.0, "shape": 0.0, "position": 0.0, "colour+position": 0.0, "all": 0.0
    }
    blank = np.full((32, 32, 3), 0.2, dtype=np.float32)
    assert read_image(blank).colour == NONE


def test_bad_words_are_named():
    with pytest.raises(ValueError, match="colour 'purple'"):
        draw("purple", "circle", "on the left", 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not of the form"):
        parse_caption("two red circles")


def test_a_mislabelled_caption_changes_one_attribute_and_never_names_a_held_out_combination():
    rng = np.random.default_rng(11)
    changed_attributes = set()
    for i in range(400):
        example = make_example(6, i)
        truth = (example.colour, example.shape, example.position)
        wrong = mislabel(*truth, rng)
        changed = [k for k in range(3) if truth[k] != wrong[k]]
        assert len(changed) == 1, (truth, wrong)
        changed_attributes.add(changed[0])
        assert wrong in TRAIN_COMBINATIONS and wrong not in HELD_OUT
    assert changed_attributes == {0, 1, 2}


def test_a_mislabelled_caption_changes_only_the_attributes_allowed():
    rng = np.random.default_rng(12)
    for i in range(200):
        example = make_example(7, i)
        truth = (example.colour, example.shape, example.position)
        wrong = mislabel(*truth, rng, attributes=("position",))
        assert wrong[:2] == truth[:2] and wrong[2] != truth[2] and wrong in TRAIN_COMBINATIONS
