"""Test environment: offline hub, no analytics, one torch thread, the repo root importable.

One thread: the tiny models gain nothing from two, and on a shared 2-core machine two threads that
contend with another process run ~20× slower (8.8 ms vs 182 ms per tiny UNet call, measured here).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses too
os.environ.setdefault("PLAYGROUND_THREAD_CACHE", "off")  # every test measures its own thread choice
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

TINY_FAMILIES = ("sd", "sd_v", "sd_zsnr", "sdxl", "pixart_sigma", "sd3")


@pytest.fixture(scope="session")
def tiny_loader():
    """A ModelLoader holding one tiny pipeline per family, registered under the family key."""
    from pipelines.loading import ModelLoader
    from tests.tiny import tiny_pipeline

    loader = ModelLoader(device="cpu")
    for family in TINY_FAMILIES:
        loader.add(family, tiny_pipeline(family))
    return loader
