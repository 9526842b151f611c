"""Offline loading: which models are available without the network, and one actionable line when one is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.loading import ModelLoader, is_available_offline, is_hub_id
from pipelines.registry import MODELS

HUB_MODELS = [k for k, m in MODELS.items() if is_hub_id(m.source)]


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def cache_file(cache: Path, repo_id: str, filename: str, text: str) -> None:
    """One file in the hub cache layout huggingface_hub writes: refs/main -> snapshots/<commit>/<file>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_registry_hub_models_are_unavailable_in_an_empty_cache(empty_cache: Path) -> None:
    assert HUB_MODELS and "sd-1.5" in HUB_MODELS
    for key in HUB_MODELS:
        assert is_available_offline(key) is False, key
    assert is_available_offline("tiny-shapes") is True  # the embedded folder
    assert is_available_offline(str(empty_cache)) is False  # a folder without model_index.json
    assert is_available_offline("not a/valid//id") is False


def test_a_cached_model_index_counts_as_available(empty_cache: Path) -> None:
    source = MODELS["sd-1.5"].source
    cache_file(empty_cache, source, "model_index.json", json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert is_available_offline("sd-1.5") is True
    assert is_available_offline(source) is True
    assert is_available_offline("sdxl-base") is False


def test_uncached_hub_model_fails_with_one_actionable_line(empty_cache: Path) -> None:
    loader = ModelLoader(device="cpu", allowed=["sd-1.5"])
    with pytest.raises(ValueError) as e:
        loader.get("sd-1.5")
    message = str(e.value)
    assert "\n" not in message and "stacktrace" not in message
    assert message.startswith("model 'sd-1.5' (stable-diffusion-v1-5/stable-diffusion-v1-5) is not in the local "
                              "Hugging Face cache")
    assert "`hf download stable-diffusion-v1-5/stable-diffusion-v1-5`" in message and "HF_HUB_OFFLINE" in message
    assert str(empty_cache) in message


def test_partly_cached_hub_model_fails_with_one_line(empty_cache: Path) -> None:
    source = MODELS["sd-1.5"].source
    cache_file(empty_cache, source, "model_index.json", json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }))
    with pytest.raises(ValueError) as e:
        ModelLoader(device="cpu").get("sd-1.5")
    message = str(e.value)
    assert "\n" not in message and "stacktrace" not in message
    assert message.startswith("model 'sd-1.5' (stable-diffusion-v1-5/stable-diffusion-v1-5) could not be loaded")
    assert message.endswith("only partly in the local Hugging Face cache: finish it with "
                            "`hf download stable-diffusion-v1-5/stable-diffusion-v1-5`")


def test_not_allowed_comes_before_any_cache_check(empty_cache: Path) -> None:
    with pytest.raises(ValueError, match="is not offered here; choose one of: tiny-shapes"):
        ModelLoader(device="cpu", allowed=["tiny-shapes"]).get("sd-1.5")
