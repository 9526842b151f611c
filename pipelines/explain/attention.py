"""6. Which word drew where: per-word cross-attention maps of one run (pipelines/attention.py), per step and for the
whole run, over x̂0 and over the final image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from guidance.registry import create as create_guidance
from pipelines.attention import (AttentionCollector, PromptWords, Word, normalized, probing, run_words, share_on,
                                 upsample)
from pipelines.explain.common import Cancelled, Turn, _r, _save, _Watch, _X0, finish, seeded
from pipelines.explain.figures import grid_image
from pipelines.explain.jump import kept_steps, nearest_kept
from pipelines.families import family_of
from pipelines.generate import generate, resolve_size
from pipelines.loading import ModelLoader
from pipelines.observers import TeeObserver
from pipelines.outputs import save_image, write_json
from pipelines.types import GenerationRequest, GenerationResult
from shapes.judge import coverage

REGION = 0.4  # DAAM's threshold τ: a word's region is where its map, scaled to [0, 1] (normalized()), is at least this


@dataclass(frozen=True)
class AttentionStep:
    """The word maps at one step of the run."""

    step: int  # 0-based loop index
    sigma: float | None  # noise level σ at this step
    maps: np.ndarray | None  # (words, h, w) float32 on the latent grid, summed over the layers; None where not kept
    x0: np.ndarray | None  # decoded x̂0, (H, W, 3) uint8; None where not kept (or not decoded yet)


@dataclass(frozen=True)
class AttentionReport:
    """Which word drew where, for one run."""

    request: GenerationRequest  # seed filled in
    result: GenerationResult  # the run (its final image, its seed, its size)
    read: PromptWords  # what the encoder read (the prompt; PixArt-Σ: its cleaned caption; a prompt schedule: each of
    # its texts and the steps that read it) and the mapped words, in order
    total: np.ndarray  # (words, h, w) float32: the whole run's maps, summed over the steps
    steps: tuple[AttentionStep, ...]  # one per loop step (while decoding: those decoded so far)
    layers: int  # attention layers that gave each step's maps
    preview: str  # how x̂0 was decoded
    done: bool
    decoding: bool = False  # x̂0 are still being decoded: `steps` holds those so far

    @property
    def words(self) -> tuple[Word, ...]:
        """The mapped words, in prompt order (a prompt schedule's texts merged)."""
        return self.read.words

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image in pixels."""
        return self.result.height, self.result.width

    def word(self, key: int | str) -> Word:
        """A word by its index, or the first with this text (case-insensitive); ValueError naming the words."""
        for w in self.words:
            if w.index == key or (isinstance(key, str) and w.text.lower() == key.lower()):
                return w
        raise ValueError(f"no word {key!r}; the words are {', '.join(repr(w.text) for w in self.words)}")

    def step_near(self, i: int) -> AttentionStep:
        """The step with kept maps nearest to loop index i (i itself unless a memory budget thinned them)."""
        return nearest_kept(self.steps, i, lambda s: s.maps is not None)

    def image_maps(self, step: int | None = None) -> np.ndarray:
        """(words, H, W) at image size: the whole run's maps (step None) or one kept step's."""
        maps = self.total if step is None else self.steps[step].maps
        if maps is None:
            raise ValueError(f"the maps of step {step + 1} were not kept (a memory budget); see step_near()")
        return upsample(maps, *self.size)

    def word_map(self, key: int | str, step: int | None = None) -> np.ndarray:
        """(H, W) float32 in [0, 1]: a word's map at image size, scaled by its minimum and maximum (as DAAM)."""
        return normalized(self.image_maps(step)[self.word(key).index])

    def overlay(self, key: int | str, step: int | None = None) -> np.ndarray:
        """(H, W, 3) uint8: a word's map as heat over x̂0 at `step` (the final image for the whole run)."""
        base = np.asarray(self.result.image.convert("RGB")) if step is None else self.steps[step].x0
        if base is None:
            raise ValueError(f"x̂0 of step {step + 1} was not kept or not decoded yet")
        return heat_over(base, self.word_map(key, step))

    def regions_on(self, mask: np.ndarray) -> np.ndarray:
        """Per word, the share of its region (where its whole-run map, scaled to [0, 1], is at least REGION: DAAM's
        segmentation) that lies where `mask` (H, W) > 0.5."""
        inside = np.asarray(mask) > 0.5
        regions = [self.word_map(w.index) >= REGION for w in self.words]
        return np.array([(r & inside).sum() / max(int(r.sum()), 1) for r in regions], np.float32)

    def mass_on(self, mask: np.ndarray) -> np.ndarray:
        """Per word, the share of its whole-run map's mass (the attention itself, unscaled) where `mask` > 0.5."""
        return share_on(self.image_maps(), (np.asarray(mask) > 0.5).astype(np.float32))

    def shares(self) -> np.ndarray:
        """Per word, its part of all the words' attention over the run (sums to 1)."""
        mass = self.total.reshape(len(self.words), -1).sum(1)
        return mass / max(float(mass.sum()), 1e-30)

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (as the UI and the API show them): the words and their shares, per step σ."""
        return {"experiment": "attention", "seed": self.request.seed, "request": self.request.to_dict(),
                "done": self.done, "family": self.result.family, "text": self.read.texts[0], "layers": self.layers,
                "segments": [{"first_step": f, "text": t} for f, t in zip(self.read.firsts, self.read.texts)],
                "preview": self.preview, "height": self.result.height, "width": self.result.width,
                "words": [{"word": w.text, "index": w.index, "tokens": list(w.tokens), "share": _r(s),
                           "segments": [k for k, p in enumerate(self.read.positions) if p[w.index]]}
                          for w, s in zip(self.words, self.shares())],
                "steps": [{"step": s.step, "sigma": _r(s.sigma)} for s in self.steps],
                "map_steps": [s.step for s in self.steps if s.maps is not None]}  # steps whose maps are kept

    def write(self, out: str | Path, mask: np.ndarray | None = None) -> dict[str, Any]:
        """OUT/image.png (the run's image and its settings), OUT/attention.json (to_dict(), each word's "map" and its
        per-step maps, paths relative to OUT), OUT/maps/<index>.png (greyscale, image size, whole run),
        OUT/steps/NNN_<index>.png (per kept step), OUT/steps/NNN_x0.png and OUT/attention.png (every word's map over
        the final image). `mask`: an object mask (H, W) for "object" (regions_on and mass_on), e.g. from the judge."""
        out = Path(out)
        save_image(out / "image.png", self.result)
        data = self.to_dict() | {"image": "image.png"}
        maps = [normalized(m) for m in self.image_maps()]
        for row, w, m in zip(data["words"], self.words, maps):
            row["map"] = _save(out, f"maps/{w.index}.png", _grey(m))
            row["steps"] = []
        for row, s in zip(data["steps"], self.steps):
            if s.x0 is not None:
                row["x0"] = _save(out, f"steps/{s.step:03d}_x0.png", s.x0)
            if s.maps is None:
                continue
            for word_row, w, m in zip(data["words"], self.words, self.image_maps(s.step)):
                word_row["steps"].append({"step": s.step,
                                          "map": _save(out, f"steps/{s.step:03d}_{w.index}.png", _grey(normalized(m)))})
        if mask is not None:
            data["object"] = {"area": _r(float((np.asarray(mask) > 0.5).mean())), "region_threshold": REGION}
            for row, region, mass in zip(data["words"], self.regions_on(mask), self.mass_on(mask)):
                row["on_object"] = {"region": _r(float(region)), "mass": _r(float(mass))}
        final = np.asarray(self.result.image.convert("RGB"))
        _save(out, "attention.png", grid_image([[final, *(heat_over(final, m) for m in maps)]],
                                               col_labels=["image", *(_ascii(w.text) for w in self.words)],
                                               title=f"which word drew where (seed {self.request.seed}, whole run)"))
        write_json(out / "attention.json", data)
        return data


def _grey(image_map: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 greyscale."""
    return (np.clip(image_map, 0, 1) * 255 + 0.5).astype(np.uint8)


def _ascii(text: str) -> str:
    """A label PIL's default font can draw."""
    return text.encode("ascii", "replace").decode()


def heat_over(image: np.ndarray, image_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) map in [0, 1] -> the map as heat (dark red, yellow, white) over the image in
    grey at 80 % brightness, at most 60 % opaque: the picture stays visible under the heat."""
    x = np.clip(image_map, 0, 1)[..., None].astype(np.float32)
    heat = np.concatenate([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)
    grey = (image.astype(np.float32) / 255 @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    alpha = 0.6 * np.clip(1.6 * x, 0, 1)
    return (np.clip(0.8 * grey * (1 - alpha) + heat * alpha, 0, 1) * 255 + 0.5).astype(np.uint8)


def object_mask(image: Any) -> np.ndarray:
    """(H, W) in [0, 1]: where the largest object of a shapes-world picture (the embedded model's) is, as the judge
    segments it by colour (shapes.judge.coverage); all zeros when it finds none."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    found = coverage(pixels)
    return np.zeros(pixels.shape[:2], np.float32) if found is None else found[0].astype(np.float32)


def attention(request: GenerationRequest, *, loader: ModelLoader, cancelled: Cancelled | None = None,
              max_image_bytes: int | None = None, run_seconds: float | None = None) -> Iterator[AttentionReport]:
    """One run with the attention probes installed: every word's map per step and for the whole run, then x̂0 of
    the kept steps decoded (in slices: reports with decoding=True between them).

    max_image_bytes: the maps and decoded x̂0 the report may hold (None: every step's); past it, evenly spaced steps
    keep theirs (AttentionReport.step_near) and the others only σ. Raises ValueError for a family without mapped
    attention and for a prompt without words."""
    request = seeded(request)
    pipe, _ = loader.view(request.model, request.scheduler)
    family = family_of(pipe)
    read = run_words(pipe, family, [(segment.first, segment.text) for segment in request.schedule.prompt])
    height, width = resolve_size(request, pipe, family)
    latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    method = create_guidance(request.guidance, request.guidance_scale, request.guidance_params,
                             family.prediction_type(pipe))
    collector = AttentionCollector(read, latent_hw, request.num_images_per_prompt, "perturbed" in method.uses,
                                   keep=lambda n, b: kept_steps(n, b + height * width * 3, max_image_bytes))
    watch = _Watch(cancelled, run_seconds=run_seconds)
    with probing(pipe, family, collector, loader):
        result = generate(request, TeeObserver(watch, collector), loader=loader)
    if watch.stopped(result):
        return
    watch.deadline = None  # the run's limit is spent; decoding below stops on `cancelled` alone
    decode = _X0(request, loader)
    steps, turn = [], Turn()

    def report(done: bool) -> AttentionReport:
        return AttentionReport(request, result, read, collector.total.copy(), tuple(steps), collector.layers,
                               decode.kind, done, decoding=not done)

    for e in watch.events:
        if watch.is_cancelled():
            return
        if steps and turn.over():  # a long decode gives the worker back between slices
            yield report(False)
        maps = collector.steps.get(e.step)
        steps.append(AttentionStep(e.step, e.sigma, maps, None if maps is None else decode(e.denoised)))
    yield report(True)


def attention_maps(request: GenerationRequest, *, loader: ModelLoader, **kwargs: Any) -> AttentionReport:
    """attention(...) run to its end: the finished report."""
    return finish(attention(request, loader=loader, **kwargs))
