"""The shapes world, the judge, a few-step smoke training of every stage, the export, and the committed model."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shapes import world  # noqa: E402
from training.common import ASSET  # noqa: E402

TOKENIZER_DIR = ASSET / "tokenizer"


# ---- world and captions ---------------------------------------------------------------------

def test_render_is_seeded_and_64px() -> None:
    a = world.batch(random.Random(3), 4)
    b = world.batch(random.Random(3), 4)
    assert a[0].shape == (4, 3, 64, 64) and a[0].min() >= -1 and a[0].max() <= 1
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_background_never_equals_an_object_color() -> None:
    rng = random.Random(0)
    for _ in range(500):
        s = world.sample_scene(rng)
        assert s.background not in {o.color for o in s.objects}


def test_captions_only_state_true_attributes() -> None:
    rng = random.Random(1)
    n_empty = 0
    for _ in range(1000):
        s = world.sample_scene(rng)
        c = world.caption(s, rng).removesuffix(".")
        if not c:
            n_empty += 1
            continue
        for o in s.objects:
            assert o.shape in c
        said_colors = {k for k in world.COLORS if f"{k} " in c}
        assert said_colors <= {o.color for o in s.objects} | {s.background}, c
        if len(s.objects) == 1:
            o = s.objects[0]
            for size in world.SIZES:
                assert (size in c) <= (size == o.size), c
            # a stated position is the object's cell ("top" must not be said of "top left")
            for phrase_pos, phrases in world.POSITION_PHRASES.items():
                if any(c.endswith(p) or f"{p}," in c or f"{p} on a" in c for p in phrases) and phrase_pos != o.position:
                    assert any(p in c for p in world.POSITION_PHRASES[o.position]), c
        else:
            assert s.relation in c
    assert 60 < n_empty < 140  # ~10% empty captions, so CFG's unconditional branch is learned


def test_two_object_relation_matches_geometry() -> None:
    rng = random.Random(2)
    for _ in range(300):
        s = world.sample_scene(rng, two_objects=True)
        a, b = s.objects
        if s.relation == "above":
            assert a.cy < b.cy
        elif s.relation == "below":
            assert a.cy > b.cy
        elif s.relation == "to the left of":
            assert a.cx < b.cx
        else:
            assert a.cx > b.cx


# ---- judge ----------------------------------------------------------------------------------

def test_judge_recognizes_ground_truth_renders() -> None:
    from shapes.judge import Judge, validate

    acc = validate(Judge(), n=400, seed=2024)
    for k in ("color", "shape", "position", "size"):
        assert acc[k] >= 0.95, acc


def test_judge_finds_nothing_on_a_blank_image() -> None:
    from shapes.judge import Judge

    v = Judge()(np.full((64, 64, 3), 128, np.uint8))
    assert not v.found and v.shape is None


def test_evaluation_scores_renders_of_its_targets_and_rejects_wrong_ones() -> None:
    """evaluate.score on the world's own renders of each target: ~100 %; scored against shifted targets: low."""
    from training import evaluate
    from shapes.judge import Judge

    rng = random.Random(5)
    tgts = evaluate.targets(40, seed=3)
    cell = {name: rc for rc, name in world.CELLS.items()}
    imgs = []
    for shape, color, size, pos in tgts:
        bg = rng.choice([c for c in world.COLORS if c != color])
        obj = world.make_obj(shape, color, size, *cell[pos], rng)
        imgs.append(world.render(world.Scene(bg, world.COLORS[bg], (obj,))))
    judge = Judge()
    right = evaluate.score(judge, imgs, tgts)
    assert min(right[k] for k in ("color", "shape", "position", "size", "color+shape")) >= 0.9, right
    shifted = tgts[1:] + tgts[:1]  # each image judged against another target
    wrong = evaluate.score(judge, imgs, shifted)
    assert wrong["all"] < 0.2 and wrong["color+shape"] < 0.3, wrong
    split = evaluate.by_size(judge, imgs, tgts)
    assert split["n"] == 40 and split["all"] == right
    n_small = sum(t[2] == "small" for t in tgts)
    assert 0 < n_small < 40 and split["small"]["color+shape"] * n_small + split["large"]["color+shape"] * (40 - n_small) == pytest.approx(40 * right["color+shape"])
    lo, hi = split["color+shape_95"]
    assert lo < right["color+shape"] <= hi <= 1 and hi - lo > 0.05  # a 95% interval at n = 40 is wide
    md = evaluate.markdown({"model": "m", "scheduler": "S", "n": 40, "guidance": {7.5: right}, "steps": {},
                            "paraphrased": wrong, "combinations": split}, 7.5, 20)
    assert "| CFG 7.5 |" in md and "color & shape" in md and "| paraphrased |" in md
    assert "| small objects |" in md and "95% interval" in md


def test_paraphrases_keep_every_attribute() -> None:
    from training import evaluate

    rng = random.Random(0)
    for shape, color, size, pos in evaluate.targets(100, seed=1):
        p = evaluate.paraphrase(shape, color, size, pos, rng).removesuffix(".")
        assert f"{size} {color} {shape}" in p and any(p.endswith(ph) for ph in world.POSITION_PHRASES[pos]), p


# ---- tokenizer ------------------------------------------------------------------------------

@pytest.mark.skipif(not TOKENIZER_DIR.exists(), reason="model not exported yet")
def test_tokenizer_is_openai_clip() -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    assert len(tok) == 49408 and tok.model_max_length == 77
    # Reference ids of openai/clip-vit-* for this sentence.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok("", padding="max_length", max_length=77).input_ids
    assert ids[:2] == [49406, 49407] and set(ids[1:]) == {49407}


# ---- smoke training + export ----------------------------------------------------------------

@pytest.mark.skipif(not TOKENIZER_DIR.exists(), reason="model not exported yet")
def test_smoke_training_and_export_load_in_stock_diffusers(tmp_path: Path) -> None:
    import pickle
    import shutil

    from diffusers import DiffusionPipeline

    from training import encode, export, train_unet, train_vae
    from training.tokenizer import load as load_tokenizer

    shutil.copytree(TOKENIZER_DIR, tmp_path / "tokenizer")
    m = train_vae.train(tmp_path, minutes=1, steps=3, batch_size=4, lr=1e-3, kl_weight=1e-6, seed=0, tiny=True)
    assert m["step"] == 3 and np.isfinite(m["mse"])
    vae = train_vae.load_vae(tmp_path, tiny=True)
    latents, scenes = encode.encode(vae, 16, seed=0, chunk=8)
    assert latents.shape == (16, 4, 16, 16)
    torch.save({"latents": latents, "scaling_factor": float(1 / latents.float().std()), "seed": 0}, tmp_path / "latents.pt")
    (tmp_path / "scenes.pkl").write_bytes(pickle.dumps(scenes))
    v1 = train_unet.SCHEDULER_CONFIG | {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    r = train_unet.train(tmp_path, minutes=1, batch_size=4, lr=1e-3, seed=0, tiny=True, max_steps=3, warmup=1,
                         noisy_weight=8, scheduler_config=v1)
    assert r["step"] == 3  # v1's recipe: epsilon on SD's schedule
    # A checkpoint of another objective gives the initial weights of a fresh v-prediction / zero-SNR run.
    before = torch.load(tmp_path / "unet.pt", weights_only=False)
    r = train_unet.train(tmp_path, minutes=1, batch_size=4, lr=1e-3, seed=0, tiny=True, max_steps=2, warmup=1)
    s = torch.load(tmp_path / "unet.pt", weights_only=False)
    assert r["step"] == 2 and s["objective"] == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    assert s["init_from"]["objective"] == train_unet.V1_OBJECTIVE and s["init_from"]["step"] == 3
    # It started from v1's weights, not from scratch: two small steps moved them little against a fresh init's distance.
    fresh = train_unet.build_models(tiny=True)[1].state_dict()
    moved = sum(float((s["unet"][k] - before["unet"][k]).abs().sum()) for k in fresh)
    apart = sum(float((fresh[k] - before["unet"][k]).abs().sum()) for k in fresh)
    assert 0 < moved < apart / 10, (moved, apart)
    r = train_unet.train(tmp_path, minutes=1, batch_size=4, lr=1e-3, seed=0, tiny=True, max_steps=3, warmup=1,
                         min_snr_gamma=5)
    assert r["step"] == 3  # same objective: resumed

    # The decoder learns to decode averaged latents to averaged images; the encoder (and so the latents) stays.
    from training import train_decoder_mean

    encoder = {k: v.clone() for k, v in train_vae.load_vae(tmp_path, tiny=True).encoder.state_dict().items()}
    d = train_decoder_mean.train(tmp_path, minutes=1, steps=2, lr=1e-3, mean_weight=2, group=2, groups=2, batch_size=2,
                                 seed=0, warmup=1, tiny=True)
    assert d["step"] == 2 and np.isfinite(d["after"]["mean_rms"])
    tuned = train_vae.load_vae(tmp_path, tiny=True)  # now from vae_decoder.pt
    assert all(torch.equal(v, tuned.encoder.state_dict()[k]) for k, v in encoder.items())
    assert train_decoder_mean.group_renders(random.Random(0), 2, 3).shape == (6, 3, 64, 64)

    # export via the same code path as the real model, with the tiny VAE
    pipe, _ = export.build_pipeline(tmp_path, tiny=True)
    dest = export.export(pipe, tmp_path / "model", tokenizer_dir=tmp_path / "tokenizer")
    loaded = DiffusionPipeline.from_pretrained(dest)
    assert loaded.unet.dtype == torch.float32 and loaded.text_encoder.dtype == torch.float32
    out = loaded("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert load_tokenizer(dest / "tokenizer")("a red circle").input_ids[0] == 49406


def test_v_loss_weights_keep_the_terminal_step() -> None:
    """Min-SNR for v is min(SNR, gamma) / (SNR + 1): 0 at zero terminal SNR, where the model learns its first x̂0 (the
    prompt's mean image); the floor keeps weight 1 there. Plain weights are 1."""
    from diffusers import DDPMScheduler

    from training import train_unet

    acp = DDPMScheduler(**train_unet.SCHEDULER_CONFIG).alphas_cumprod
    assert float(acp[-1]) == 0.0  # rescaled to zero terminal SNR
    t = torch.tensor([0, 500, 999])
    w = train_unet.loss_weights(acp, t, 5.0, 0.0, "v_prediction")
    assert torch.isfinite(w).all() and float(w[-1]) == 1.0 and float(w[0]) < 0.01
    assert torch.equal(train_unet.loss_weights(acp, t, 0.0, 0.0, "v_prediction"), torch.ones(3))


def test_small_object_crops_centre_on_small_objects_and_weight_them() -> None:
    from training import train_vae

    rng = random.Random(3)
    scenes = [world.sample_scene(rng, two_objects=True) for _ in range(3000)]
    scenes = [s for s in scenes if {o.size for o in s.objects} == {"small", "large"}]
    assert len(scenes) > 1000
    for sw, lo, hi in ((1.0, 0.45, 0.55), (3.0, 0.82, 0.93)):  # a fair draw of the two; 3/4 + 1/4 * 1/2 = 7/8
        r = random.Random(4)
        frac = np.mean([train_vae.pick_object(s, r, sw).size == "small" for s in scenes])
        assert lo < frac < hi, (sw, frac)
    for sw in (1.0, 3.0):
        _, w = train_vae.object_crops(random.Random(5), 64, 32, sw)
        assert w.shape == (64, 1, 32, 32) and float(w.min()) == 1  # background weight 1 in every batch
        assert float(w.max()) == 1 + train_vae.OBJECT_WEIGHT * sw  # small objects' pixels weigh sw times more


def test_refining_the_vae_with_an_anchor_keeps_its_latents_near_the_old_ones(tmp_path: Path) -> None:
    """--init/--anchor: a UNet trained on the old latents must stay nearly valid for the new encoder's."""
    import shutil

    from training import train_vae

    torch.manual_seed(0)
    init = tmp_path / "old.pt"
    torch.save({"model": train_vae.build_vae(tiny=True).state_dict()}, init)
    x = torch.from_numpy(world.batch(random.Random(9), 8)[0])
    drift = {}
    for anchor in (0.0, 100.0):
        out = tmp_path / f"a{anchor:g}"
        out.mkdir()
        shutil.copy(init, out / "vae.pt")  # the old one stays in place
        r = train_vae.train(out, minutes=1, steps=4, batch_size=4, lr=1e-2, kl_weight=1e-6, seed=0, tiny=True,
                            init=init, anchor=anchor, small_weight=3.0, warmup=1)
        assert r["step"] == 4
        again = train_vae.train(out, minutes=1, steps=5, batch_size=4, lr=1e-2, kl_weight=1e-6, seed=0, tiny=True,
                                init=init, anchor=anchor, small_weight=3.0, warmup=1)
        assert again["step"] == 5  # its own refinement checkpoint is resumed
        old, new = train_vae.build_vae(tiny=True), train_vae.load_vae(out, tiny=True)
        old.load_state_dict(torch.load(init, weights_only=False)["model"])
        with torch.no_grad():
            drift[anchor] = float((new.encode(x).latent_dist.mean - old.encode(x).latent_dist.mean).pow(2).mean())
    assert 0 < drift[100.0] < 0.5 * drift[0.0], drift


@pytest.mark.skipif(not (ASSET / "training_meta.json").exists(), reason="model not exported yet")
def test_restore_rebuilds_the_cache_from_the_shipped_model_and_training_continues(tmp_path: Path) -> None:
    """A fresh machine has no cache: restore -> encode -> one more step -> export must round-trip the shipped weights."""
    import json
    import pickle

    from safetensors.torch import load_file

    from training import encode, export, restore, train_unet, train_vae

    r = restore.restore(ASSET, tmp_path)
    meta = json.loads((ASSET / "training_meta.json").read_text())
    assert r["step"] == meta["unet_step"] > 0
    with pytest.raises(SystemExit, match="exists"):
        restore.restore(ASSET, tmp_path)  # never overwrites a checkpoint that may be newer

    # Exporting the restored checkpoint untouched gives the shipped weights back, bit for bit (fp16 -> fp32 -> fp16).
    pipe, state = export.build_pipeline(tmp_path)
    dest = export.export(pipe, tmp_path / "model", tokenizer_dir=tmp_path / "tokenizer")
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a, b = load_file(dest / part / f"{name}.safetensors"), load_file(ASSET / part / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert pipe.vae.config.scaling_factor == pytest.approx(meta["scaling_factor"])

    # Training continues from the restored step with fresh optimizer state and a re-warmed learning rate.
    vae = train_vae.load_vae(tmp_path)
    latents, scenes = encode.encode(vae, 4, seed=0, chunk=4)
    torch.save({"latents": latents, "scaling_factor": r["scaling_factor"], "seed": 0}, tmp_path / "latents.pt")
    (tmp_path / "scenes.pkl").write_bytes(pickle.dumps(scenes))
    out = train_unet.train(tmp_path, minutes=1e6, batch_size=2, lr=1e-3, seed=0, max_steps=r["step"] + 1,
                           ckpt_every_s=1e9)
    assert out["step"] == r["step"] + 1
    s = torch.load(tmp_path / "unet.pt", weights_only=False)
    assert s["warm_from"] == r["step"] and "opt" in s
    te, unet, _ = train_unet.load_checkpoint(tmp_path, ema=False)
    with torch.no_grad():
        moved = sum(float((p - q).abs().sum()) for p, q in zip(unet.parameters(), pipe.unet.parameters()))
    assert 0 < moved  # the step changed the weights, at the re-warmed LR (1e-3 / 300)


# ---- the committed model --------------------------------------------------------------------

@pytest.mark.skipif(not (ASSET / "model_index.json").exists(), reason="model not exported yet")
def test_committed_model_loads_offline_and_makes_64px_images() -> None:
    import json

    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file())
    assert size < 30 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(ASSET)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    c = pipe.scheduler.config  # v2: zero terminal SNR, v-prediction, sampled from the last timestep (Lin et al. 2023)
    assert c.beta_schedule == "scaled_linear" and c.prediction_type == "v_prediction"
    assert c.rescale_betas_zero_snr and c.timestep_spacing == "trailing"
    image = pipe("a large red circle in the center", num_inference_steps=5, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert image.size == (64, 64)
    preview = json.loads((ASSET / "latent_preview.json").read_text())
    assert np.array(preview["latent_rgb_factors"]).shape == (4, 3) and len(preview["latent_rgb_bias"]) == 3
