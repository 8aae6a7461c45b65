"""Shared fixtures: an isolated cache/wandb environment for every test and a tiny random U-Net denoiser."""

from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpolicy.denoiser import wrap_denoiser
from qpolicy.diffusion import make_schedule
from qpolicy.models import UNet, preset_config


#: `make test-all` sets this: the real-tool tests (export targets, Ray) must run there, so a missing package fails
#: them instead of skipping them silently
REQUIRE_ENV = "QPOLICY_REQUIRE_EXPORT"


def require(module: str):
    """``module`` imported for a real-tool test: skipped when it is not installed, failed instead when
    ``QPOLICY_REQUIRE_EXPORT=1`` (``make test-all``). Use it in every test that needs an optional extra."""
    if os.environ.get(REQUIRE_ENV) == "1":
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{REQUIRE_ENV}=1 but {module!r} cannot be imported ({e}): install the export/sweep "
                        "extras (pip install -e '.[test,sweep,export]')", pytrace=False)
    return pytest.importorskip(module)


#: the tests' persistent XLA compilation cache (shared by the xdist workers and by `make test` / `make test-all`, so a
#: program compiled by one test process is loaded, not recompiled, by the next); QPOLICY_TEST_JAX_CACHE=0 turns it off
JAX_CACHE_ENV = "QPOLICY_TEST_JAX_CACHE"


def pytest_configure(config):
    where = os.environ.get(JAX_CACHE_ENV, str(config.rootpath / ".pytest_cache" / "jax_compile"))
    if where != "0":
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own QPOLICY_CACHE and never talks to wandb."""
    monkeypatch.setenv("QPOLICY_CACHE", str(tmp_path_factory.mktemp("qcache")))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One QPOLICY_CACHE for a whole test module (``pytestmark = pytest.mark.usefixtures("module_cache")``), so its
    tests share calibration products and reference banks instead of recomputing them per test."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QPOLICY_CACHE", str(tmp_path_factory.mktemp("qcache")))
    yield
    mp.undo()


def random_params(module, image_shape, seed=0):
    """Random params with the structure of ``module.init`` (from ``eval_shape``, so nothing is compiled):
    kernels ~ N(0, 1/fan_in) (lecun-normal scale, as flax's default), small random biases, GroupNorm
    scales near 1. Eager ``module.init`` costs 10-30 s of per-op XLA compiles on CPU; this costs ~0.1 s."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda k: module.init(k, x, jnp.zeros((1,), jnp.int32)), jax.random.key(0))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            w = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif name == "scale":
            w = 1.0 + 0.1 * rng.standard_normal(s.shape)
        else:
            w = 0.02 * rng.standard_normal(s.shape)
        return jnp.asarray(w, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="session")
def tiny_denoiser():
    """Random-init ``tiny`` U-Net on 8x8x1 images, linear schedule with 100 steps. Treat as read-only."""
    module = UNet(preset_config("tiny", image_size=8, in_channels=1))
    return wrap_denoiser(module, {"params": random_params(module, (8, 8, 1))}, image_shape=(8, 8, 1),
                         schedule=make_schedule("linear", 100), name="tiny")
