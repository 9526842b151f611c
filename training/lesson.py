"""Does the embedded model teach the lesson? The measurements of the model card's "Lesson" table (EVAL.md).

Every number is read by the strict geometric reading (shapes/reading.py), never by the learned judge:
- backgrounds: one-object prompts that name a background, several seeds each: is the background the one named?
- strict: the world's one-object prompts at given settings (scheduler, scale, guidance rescale): colour, shape,
  position and size read strictly, and how far the colours sit from their palette (over-saturation pushes them off);
- first_x0: x̂0 after step 1 of 20 (euler_a, CFG 1), decoded, against the pixel mean of 16 endings run from the same
  x_T with different ancestral noise: RMS distance, and high-frequency energy (mean squared Laplacian) against the
  mean's and the endings'. The blurry average is what the first x̂0 of a well-posed model is;
- noise_mean_swap: seed a's x_T with seed b's per-channel spatial means: does the image take b's background? It did
  on v1 (scaled_linear schedule: sqrt(alpha_bar_T) = 0.068 kept the image's mean in x_T);
- guidance_distance: how far each guidance method (its defaults) moves the image from plain CFG, in levels of 255.

    python -m training.lesson --model assets/models/tiny-shapes --out ~/.cache/tiny-shapes-v2/lesson.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from scipy import ndimage

from guidance.registry import METHODS
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.schedulers import make_scheduler
from pipelines.types import GenerationRequest
from shapes import reading, world
from shapes.judge import MIN_AREA, coverage
from training.common import ASSET, CACHE, setup

ATTRS = ("color", "shape", "position", "size")
FIRST_X0_PROMPTS = ("a large red circle in the center", "a small blue star in the top left",
                    "a large yellow heart at the bottom", "a green square on the right")
# The issue's own probe: one object, four background words, eight seeds.
FIXED_BACKGROUNDS = ("blue", "yellow", "white", "purple")


def one_object_targets(n: int, seed: int, background: bool) -> list[dict[str, str]]:
    """n balanced one-object targets {shape, color, size, position[, background]} (background != colour)."""
    rng = random.Random(seed)
    combos = list(itertools.product(world.SHAPES, world.COLORS, world.SIZES, world.POSITIONS))
    rng.shuffle(combos)
    out = []
    for shape, color, size, position in combos[:n]:
        t = {"shape": shape, "color": color, "size": size, "position": position}
        if background:
            t["background"] = rng.choice([c for c in world.COLORS if c != color])
        out.append(t)
    return out


def prompt_of(t: dict[str, str], comma: bool = False) -> str:
    """The full caption; with a background either 'on a blue background' or ', blue background' (both trained)."""
    if "background" in t and comma:
        return world.full_caption(t["shape"], t["color"], t["size"], t["position"]) + f", {t['background']} background"
    return world.full_caption(t["shape"], t["color"], t["size"], t["position"], t.get("background"))


def images(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int, scale: float,
           rescale: float = 0.0, chunk: int = 50) -> list[np.ndarray]:
    """uint8 (64, 64, 3) images from the stock pipeline, one CPU generator per image (what generate() gives)."""
    out = []
    for i in range(0, len(prompts), chunk):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + chunk]]
        res = pipe(prompts[i : i + chunk], num_inference_steps=steps, guidance_scale=scale, guidance_rescale=rescale,
                   generator=gens, output_type="np").images
        out += [(im * 255).round().astype(np.uint8) for im in res]
    return out


def palette_error(img: np.ndarray, t: dict[str, str]) -> float:
    """Mean RGB distance of the border (background) and of the object's core from their palette colours."""
    a = img.astype(np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    errs = []
    if "background" in t:
        errs.append(float(np.linalg.norm(np.median(border, 0) - np.array(world.COLORS[t["background"]]))))
    cov = coverage(img)  # the object region reading.read finds (judge.coverage)
    if cov is not None and (cov[0] > 0.5).sum() >= MIN_AREA:
        errs.append(float(np.linalg.norm(cov[1] - np.array(world.COLORS[t["color"]]))))
    return statistics.fmean(errs) if errs else float("nan")


def clipped(img: np.ndarray) -> float:
    """Fraction of pixels with a channel at 0 or 255 (the world's palette reaches 255 only in jitter)."""
    return float(((img <= 0) | (img >= 255)).any(-1).mean())


def read_all(imgs: list[np.ndarray], tgts: list[dict[str, str]]) -> dict[str, float]:
    """Per attribute: fraction read strictly as the target; 'all' = every attribute of the target."""
    hits = {k: 0 for k in (*ATTRS, "background", "all")}
    n_bg = 0
    for im, t in zip(imgs, tgts):
        m = reading.read(im).matches(**t)
        for k, v in m.items():
            hits[k] += v
        hits["all"] += all(m.values())
        n_bg += "background" in t
    out = {k: hits[k] / len(tgts) for k in (*ATTRS, "all")}
    if n_bg:
        out["background"] = hits["background"] / n_bg
    return out


def backgrounds(pipe, steps: int, scale: float, rescale: float, n: int = 40, seeds: int = 4) -> dict:
    """Background named in the prompt, n targets x seeds; plus the issue's fixed probe (4 words x 8 seeds)."""
    tgts = [t for t in one_object_targets(n, seed=11, background=True) for _ in range(seeds)]
    prompts = [prompt_of(t, comma=i % 2 == 1) for i, t in enumerate(tgts)]
    imgs = images(pipe, prompts, [i % seeds for i in range(len(tgts))], steps, scale, rescale)
    fixed_t = [{"shape": "circle", "color": "red", "size": "large", "position": "center", "background": b}
               for b in FIXED_BACKGROUNDS for _ in range(8)]
    fixed = images(pipe, [f"a large red circle in the center, {t['background']} background" for t in fixed_t],
                   [i % 8 for i in range(len(fixed_t))], steps, scale, rescale)
    return {"named": read_all(imgs, tgts), "fixed_probe": read_all(fixed, fixed_t)["background"],
            "n": len(tgts), "palette_error": float(np.nanmean([palette_error(im, t) for im, t in zip(imgs, tgts)])),
            "clipped": statistics.fmean(clipped(im) for im in imgs)}


def strict(pipe, steps: int, scale: float, rescale: float, n: int = 200) -> dict:
    """The world's one-object prompts (no background named), one seed each, read strictly."""
    tgts = one_object_targets(n, seed=0, background=False)
    imgs = images(pipe, [prompt_of(t) for t in tgts], list(range(n)), steps, scale, rescale)
    return read_all(imgs, tgts) | {"palette_error": float(np.nanmean([palette_error(im, t) for im, t in zip(imgs, tgts)])),
                                   "clipped": statistics.fmean(clipped(im) for im in imgs), "n": n}


def laplacian_energy(img: np.ndarray) -> float:
    """Mean squared Laplacian of an image in [0, 1] (H, W, 3): its high-frequency energy."""
    return float(np.mean([ndimage.laplace(img[..., c]) ** 2 for c in range(img.shape[-1])]))


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((x[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def first_x0(model: str, loader: ModelLoader, prompts: tuple[str, ...] = FIRST_X0_PROMPTS,
             seeds: tuple[int, ...] = (0, 1), endings: int = 16) -> dict:
    """Step 1's decoded x̂0 (20 steps, euler_a, CFG 1) against the mean of `endings` endings from the same x_T."""
    rows = []
    for prompt, seed in itertools.product(prompts, seeds):
        base = dict(prompt=prompt, model=model, scheduler="euler_a", num_inference_steps=20, guidance_scale=1.0,
                    seed=seed)
        obs = CollectingObserver()
        generate(GenerationRequest(**base), obs, loader=loader)
        pipe = loader.get(model)
        x0 = _decode(pipe, obs.events[0].denoised)
        ends = [np.asarray(generate(GenerationRequest(**base, branch=(0, 1000 + j)), loader=loader).image,
                           dtype=np.float32) / 255 for j in range(endings)]
        mean = np.mean(ends, 0)
        rows.append({"prompt": prompt, "seed": seed, "rms": float(np.sqrt(((x0 - mean) ** 2).mean())),
                     "hf_vs_mean": laplacian_energy(x0) / laplacian_energy(mean),
                     "hf_vs_endings": laplacian_energy(x0) / statistics.fmean(laplacian_energy(e) for e in ends)})
    return {"rows": rows, "rms": statistics.fmean(r["rms"] for r in rows),
            "rms_max": max(r["rms"] for r in rows), "hf_vs_mean": statistics.fmean(r["hf_vs_mean"] for r in rows),
            "hf_vs_mean_max": max(r["hf_vs_mean"] for r in rows),
            "hf_vs_endings": statistics.fmean(r["hf_vs_endings"] for r in rows)}


def noise_mean_swap(pipe, steps: int, scale: float, rescale: float, pairs: int = 16) -> dict:
    """x_T of seed a with seed b's per-channel means: share of pairs (backgrounds of a and b differ) that take b's."""
    prompt = "a large red circle in the center"
    shape = (1, pipe.unet.config.in_channels, 16, 16)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in range(pairs + 1)]
    swapped = [noise[a] - noise[a].mean((2, 3), keepdim=True) + noise[a + 1].mean((2, 3), keepdim=True)
               for a in range(pairs)]

    def bg(latents: list[torch.Tensor]) -> list[str | None]:
        out = []
        for x in latents:
            im = pipe(prompt, num_inference_steps=steps, guidance_scale=scale, guidance_rescale=rescale,
                      latents=x,  # prepare_latents scales it by init_noise_sigma, as it does its own noise
                      output_type="np").images[0]
            out.append(reading.read((im * 255).round().astype(np.uint8)).background)
        return out

    plain, moved = bg(noise), bg(swapped)
    differ = [a for a in range(pairs) if plain[a] != plain[a + 1]]
    took_b = sum(moved[a] == plain[a + 1] for a in differ)
    kept_a = sum(moved[a] == plain[a] for a in differ)
    return {"pairs": len(differ), "took_b": took_b / max(1, len(differ)), "kept_a": kept_a / max(1, len(differ)),
            "distinct_backgrounds": len(set(plain))}


def guidance_distance(model: str, loader: ModelLoader, scale: float, n: int = 8) -> dict[str, float]:
    """Mean |RGB| (levels of 255) between each method at its defaults and plain CFG, same prompts and seeds."""
    tgts = one_object_targets(n, seed=3, background=False)
    def run(method: str) -> list[np.ndarray]:
        return [np.asarray(generate(GenerationRequest(prompt=prompt_of(t), model=model, guidance_scale=scale,
                                                      guidance=method, seed=i), loader=loader).image, dtype=np.float32)
                for i, t in enumerate(tgts)]
    cfg = run("cfg")
    return {k: statistics.fmean(float(np.abs(a - b).mean()) for a, b in zip(run(k), cfg)) for k in METHODS if k != "cfg"}


def settings(model: Path, schedulers: list[str], scales: list[float], rescales: list[float], steps: int = 20,
             n: int = 100) -> list[dict]:
    """Strict reading and backgrounds per (scheduler, scale, rescale): every scheduler at scales[0] without rescale,
    then every scale and rescale with the first scheduler (the one to recommend is chosen from the first block)."""
    rows = []
    combos = [(k, scales[0], 0.0) for k in schedulers]
    combos += [(schedulers[0], g, r) for g in scales for r in rescales if (schedulers[0], g, r) not in combos]
    for key, scale, rescale in combos:
        pipe = load(model, key)
        row = {"scheduler": key, "scale": scale, "rescale": rescale, "strict": strict(pipe, steps, scale, rescale, n),
               "backgrounds": backgrounds(pipe, steps, scale, rescale, n=20, seeds=2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def settings_markdown(rows: list[dict]) -> str:
    head = ("| scheduler | CFG | rescale φ | colour | shape | position | size | all four | background named | "
            "palette error | clipped px |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        s, b = r["strict"], r["backgrounds"]
        lines.append(f"| {r['scheduler']} | {r['scale']:g} | {r['rescale']:g} | " + " | ".join(
            f"{100 * s[k]:.0f}%" for k in (*ATTRS, "all")) + f" | {100 * b['named']['background']:.0f}% | "
            f"{(s['palette_error'] + b['palette_error']) / 2:.0f} | {100 * (s['clipped'] + b['clipped']) / 2:.1f}% |")
    return "\n".join(lines)


def lesson_markdown(v1: dict, v2: dict) -> str:
    """The model card's "Lesson" table: v1 (the baseline) and v2 side by side, from two lesson.json results."""
    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    rows = []
    for label, get, fmt in (
        ("background named in the prompt is drawn ({n} images: 40 prompts x 4 seeds)", lambda r: r["backgrounds"]["named"]["background"], pct),
        ("... the fixed probe 'a large red circle in the center, {{blue, yellow, white, purple}} background', seeds 0-7", lambda r: r["backgrounds"]["fixed_probe"], pct),
        ("... and on those images: colour / shape / position / size", lambda r: " / ".join(pct(r["backgrounds"]["named"][k]) for k in ATTRS), str),
        ("strict reading of 200 one-object prompts: colour", lambda r: r["strict"]["color"], pct),
        ("... shape", lambda r: r["strict"]["shape"], pct),
        ("... position", lambda r: r["strict"]["position"], pct),
        ("... size", lambda r: r["strict"]["size"], pct),
        ("... all four", lambda r: r["strict"]["all"], pct),
        ("... object colour's distance from its palette entry (RGB units; over-saturation raises it)", lambda r: r["strict"]["palette_error"], lambda x: f"{x:.0f}"),
        ("... pixels with a channel at 0 or 255", lambda r: r["strict"]["clipped"], lambda x: f"{100 * x:.1f}%"),
        ("x̂0 at step 1 (euler_a, 20 steps, CFG 1) against the mean of 16 endings: RMS (mean / worst of 8)", lambda r: f"{r['first_x0']['rms']:.3f} / {r['first_x0']['rms_max']:.3f}", str),
        ("... its high-frequency energy against the mean's (mean / worst)", lambda r: f"{r['first_x0']['hf_vs_mean']:.1f}x / {r['first_x0']['hf_vs_mean_max']:.1f}x", str),
        ("... against a single ending's", lambda r: f"{r['first_x0']['hf_vs_endings']:.2f}x", str),
        ("x_T of seed a with seed a+1's channel means takes a+1's background (pairs whose backgrounds differ)", lambda r: f"{pct(r['noise_mean_swap']['took_b'])} of {r['noise_mean_swap']['pairs']}", str),
        ("distinct backgrounds over 17 seeds of 'a large red circle in the center'", lambda r: r["noise_mean_swap"]["distinct_backgrounds"], str),
    ):
        rows.append(f"| {label.format(n=v2['backgrounds']['n'])} | {fmt(get(v1))} | {fmt(get(v2))} |")
    methods = "; ".join(f"{k} {v1['guidance_distance'][k]:.1f} → {v2['guidance_distance'][k]:.1f}" for k in v2["guidance_distance"])
    rescale = f", guidance rescale {v2['rescale']:g}" if v2.get("rescale") else ""
    return "\n".join([
        f"Both at their recommended settings: v1 {v1['scheduler']}, CFG {v1['scale']:g}; v2 {v2['scheduler']}, CFG "
        f"{v2['scale']:g}{rescale}; 20 steps. Read by the strict geometric reading (shapes/reading.py), not the "
        "learned judge.", "",
        "| measure | v1 | v2 |", "|---|---|---|", *rows, "",
        "How far each guidance method at its defaults moves the image from plain CFG (mean |RGB|, levels of 255, "
        f"8 prompts, v1 → v2): {methods}."]) + "\n"


def load(model: Path, scheduler: str | None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = make_scheduler(pipe.scheduler, scheduler)
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ASSET)
    p.add_argument("--scheduler", default=None, help="scheduler key for the stock runs; default: the model's own")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--rescale", type=float, default=0.0, help="guidance_rescale φ of the stock runs")
    p.add_argument("--only", default="backgrounds,strict,first_x0,noise_mean_swap,guidance_distance")
    p.add_argument("--strict-n", type=int, default=200)
    p.add_argument("--out", type=Path, default=CACHE / "lesson.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", action="store_true",
                   help="instead: compare --schedulers (at the first of --scales) and --scales x --rescales")
    p.add_argument("--schedulers", default="dpmpp_2m,euler_a,ddim,unipc,euler")
    p.add_argument("--scales", default="5,3,7.5")
    p.add_argument("--rescales", default="0,0.7")
    p.add_argument("--markdown", nargs=2, type=Path, metavar=("V1_JSON", "V2_JSON"),
                   help="instead: print the model card's lesson table from two results")
    a = p.parse_args()
    if a.markdown:
        print(lesson_markdown(*(json.loads(f.read_text()) for f in a.markdown)))
        return
    setup(a.threads)
    if a.settings:
        rows = settings(a.model, a.schedulers.split(","), [float(v) for v in a.scales.split(",")],
                        [float(v) for v in a.rescales.split(",")], a.steps, a.strict_n)
        a.out.write_text(json.dumps(rows, indent=2) + "\n")
        print(settings_markdown(rows))
        return
    pipe = load(a.model, a.scheduler)
    loader = ModelLoader(device="cpu")
    model = str(a.model.resolve())
    res: dict = {"model": model, "scheduler": a.scheduler or type(pipe.scheduler).__name__, "steps": a.steps,
                 "scale": a.scale, "rescale": a.rescale}
    only = a.only.split(",")
    jobs = {"backgrounds": lambda: backgrounds(pipe, a.steps, a.scale, a.rescale),
            "strict": lambda: strict(pipe, a.steps, a.scale, a.rescale, a.strict_n),
            "first_x0": lambda: first_x0(model, loader),
            "noise_mean_swap": lambda: noise_mean_swap(pipe, a.steps, a.scale, a.rescale),
            "guidance_distance": lambda: guidance_distance(model, loader, a.scale)}
    for name in only:
        res[name] = jobs[name]()
        print(name, json.dumps(res[name] if name != "first_x0" else {k: v for k, v in res[name].items() if k != "rows"}),
              flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
