"""Shared fixtures: an isolated cache/wandb environment for every test and a tiny random U-Net denoiser."""

from __future__ import annotations

import jax
import pytest

from qpolicy.denoiser import wrap_denoiser
from qpolicy.diffusion import make_schedule
from qpolicy.models import init_unet, preset_config


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own QPOLICY_CACHE and never talks to wandb."""
    monkeypatch.setenv("QPOLICY_CACHE", str(tmp_path_factory.mktemp("qcache")))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_denoiser():
    """Random-init ``tiny`` U-Net on 8x8x1 images, linear schedule with 100 steps. Treat as read-only."""
    cfg = preset_config("tiny", image_size=8, in_channels=1)
    module, params = init_unet(cfg, jax.random.key(0))
    return wrap_denoiser(module, {"params": params}, image_shape=(8, 8, 1),
                         schedule=make_schedule("linear", 100), name="tiny")
