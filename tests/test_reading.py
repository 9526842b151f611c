"""The strict geometric reading (shapes/reading.py) reads what the world draws, and refuses what it does not."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageFilter

from shapes import reading, world


def test_renders_read_exactly():
    rng = random.Random(4)
    scenes = [world.sample_scene(rng, two_objects=False) for _ in range(150)]
    for s in scenes:
        o = s.objects[0]
        r = reading.read(world.render(s))
        assert r.matches(color=o.color, shape=o.shape, position=o.position, size=o.size, background=s.background) == \
            dict.fromkeys(("color", "shape", "position", "size", "background"), True), (s, r)


def test_a_smear_or_an_empty_field_is_not_read_as_a_shape():
    rng = random.Random(0)
    scene = world.Scene("white", world.COLORS["white"], (world.make_obj("star", "red", "large", 1, 1, rng),))
    smear = world.render(scene).filter(ImageFilter.GaussianBlur(4))
    r = reading.read(smear)
    assert r.shape is None  # its best drawing does not beat the others clearly
    empty = reading.read(Image.new("RGB", (64, 64), world.COLORS["blue"]))
    assert not empty.found and empty.background == "blue" and empty.shape is None


def test_an_off_palette_colour_is_not_named():
    scene = world.Scene("black", world.COLORS["black"],
                        (world.make_obj("circle", "red", "large", 1, 1, random.Random(0)),))
    img = np.asarray(world.render(scene)).copy()
    img[img[..., 0] > 150] = (190, 190, 100)  # between yellow, orange and white: no palette colour within tolerance
    r = reading.read(img)
    assert r.found and r.color is None and r.shape == "circle" and r.background == "black"
