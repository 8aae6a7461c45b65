"""Class-conditional denoisers: requests from image keys, classifier-free guidance, training, loading, the env's
request block, and the refusals."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpolicy.conditioning import Conditioning, guided_eps, request_features, requests
from qpolicy.denoiser import load_denoiser, wrap_denoiser
from qpolicy.diffusion import image_keys, make_schedule
from qpolicy.models import UNet, preset_config
from qpolicy.train import TrainConfig, train_denoiser

from conftest import random_params

COND = Conditioning(num_classes=3, guidance_scales=(1.0, 4.0))


def test_requests_are_a_function_of_the_key_and_cover_the_space():
    keys = image_keys(7, 600)
    y, s = requests(COND, keys)
    y2, s2 = requests(COND, keys[::-1])
    np.testing.assert_array_equal(np.asarray(y)[::-1], np.asarray(y2))  # per image, not per batch position
    np.testing.assert_array_equal(np.asarray(s)[::-1], np.asarray(s2))
    counts = np.bincount(np.asarray(y), minlength=3)
    assert counts.min() > 150, counts  # uniform over labels
    assert set(np.unique(np.asarray(s)).tolist()) == {1.0, 4.0}
    assert 0.4 < float(np.mean(np.asarray(s) == 4.0)) < 0.6
    f = request_features(COND, keys[:1])
    assert f.shape == (4,) and float(f[:3].sum()) == 1.0 and float(f[int(y[0])]) == 1.0
    assert float(f[3]) == pytest.approx(float(s[0]) / 4.0)


class Toy(nn.Module):
    """eps = x * w[y] + t: a conditional toy whose branches are known."""

    @nn.compact
    def __call__(self, x, t, y=None):
        w = self.param("w", lambda k: jnp.arange(1.0, 5.0))  # labels 0..2, null = 3
        y = jnp.full((x.shape[0],), 3) if y is None else y
        return x * w[y][:, None, None, None] + t[:, None, None, None]


def test_guided_eps_matches_the_cfg_formula():
    m = Toy()
    v = m.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), jnp.zeros((1,)))
    keys = image_keys(3, 8)
    x = jax.random.normal(jax.random.key(1), (8, 2, 2, 1))
    t = jnp.arange(8.0)
    e = guided_eps(lambda a, b, c: m.apply(v, a, b, c), COND, x, t, keys)
    y, s = map(np.asarray, requests(COND, keys))
    w = np.arange(1.0, 5.0)
    ec = np.asarray(x) * w[y][:, None, None, None] + np.asarray(t)[:, None, None, None]
    eu = np.asarray(x) * w[3] + np.asarray(t)[:, None, None, None]
    np.testing.assert_allclose(np.asarray(e), eu + s[:, None, None, None] * (ec - eu), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keys"):
        guided_eps(lambda a, b, c: m.apply(v, a, b, c), COND, x, t, None)


@pytest.mark.parametrize("bad, match", [
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 3, "guidance_scales": []}, "guidance_scales"),
    ({"num_classes": 3, "guidance_scales": [1, 1]}, "guidance_scales"),
    ({"num_classes": 3, "guidance_scales": [-1]}, "guidance_scales"),
    ({"num_classes": 3, "label_names": ["a"]}, "label_names"),
    ({"num_classes": 3, "colour": 1}, "unknown fields"),
    ({"guidance_scales": [1]}, "num_classes"),
])
def test_bad_conditioning_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Conditioning.from_dict(bad)


def _labelled_blobs(path, n=64, size=8):
    """Two classes: a blob in the left half (0) or the right half (1)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    yy, xx = np.mgrid[:size, :size]
    cx = np.where(y == 0, rng.uniform(1, 3, n), rng.uniform(5, 7, n))
    cy = rng.uniform(2, size - 2, n)
    img = np.exp(-((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2) / 3.0)
    np.savez(path, images=(2 * img - 1).astype(np.float32)[..., None], labels=y.astype(np.int32))
    return f"npz:{path}"


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond")
    data = _labelled_blobs(tmp / "blobs.npz")
    out = tmp / "cond8"
    cfg = TrainConfig(data=data, preset="tiny", steps=40, out=str(out), batch_size=16, lr=2e-3, warmup=5,
                      log_every=20, ckpt_every=1000, ema_decay=0.9, wandb="disabled", conditional=True,
                      guidance_scales=(1.0, 3.0))
    s = train_denoiser(cfg, progress=False)
    assert s["last_loss"] < s["first_loss"]
    return out


def test_conditional_training_writes_a_loadable_guided_model(cond_ckpt):
    meta = json.loads((cond_ckpt / "meta.json").read_text())
    assert meta["conditioning"] == {"num_classes": 2, "guidance_scales": [1.0, 3.0], "label_names": ["0", "1"]}
    assert meta["model_config"]["num_classes"] == 2 and meta["train"]["conditional"] is True
    den = load_denoiser(cond_ckpt)
    assert den.conditioning == Conditioning(num_classes=2, guidance_scales=(1.0, 3.0), label_names=("0", "1"))
    assert not any("label" in l.path for l in den.layers)  # the label embedding is not a quantizable layer
    keys = image_keys(0, 6)
    x = jax.random.normal(jax.random.key(2), (6, 8, 8, 1))
    t = jnp.full((6,), 50)
    e = np.asarray(den(x, t, keys))
    y, s = map(np.asarray, requests(den.conditioning, keys))
    v = den.variables
    ec = np.asarray(den.module.apply(v, x, t, jnp.asarray(y)))
    eu = np.asarray(den.module.apply(v, x, t, jnp.full((6,), 2)))
    np.testing.assert_allclose(e, eu + s[:, None, None, None] * (ec - eu), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="keys"):
        den(x, t)


def test_corrupt_conditioning_in_meta_is_refused(cond_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cond_ckpt, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["conditioning"]["num_classes"] = 5
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="meta.json: field 'conditioning': .*label_names must name all 5"):
        load_denoiser(bad)
    del meta["conditioning"]["label_names"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\(5 classes\) does not match model_config.num_classes \(2\)"):
        load_denoiser(bad)
    del meta["conditioning"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="conditioning"):
        load_denoiser(bad)


def test_env_observes_the_request_and_fp_bits_reproduce_the_reference(cond_ckpt):
    from qpolicy.envs import make_core

    env = make_core(model=str(cond_ckpt), num_steps=3, images_per_env=1, bank_size=4, quant_preset="plain")
    params = env.default_params
    names = env.obs_spec()
    assert names[names.index("label[0]"):names.index("guidance") + 1] == ["label[0]", "label[1]", "guidance"]
    obs, state = env.reset_to(jnp.asarray([2]), params)
    i0 = names.index("label[0]")
    np.testing.assert_allclose(np.asarray(obs[i0:i0 + 3]),
                               np.asarray(request_features(env.engine.den.conditioning, params.bank_keys[2:3])))
    # float bits everywhere: the quantized guided trajectory is the FP reference
    act = jnp.full(env.action_space(params).shape, env.C - 1, jnp.int32)
    for _ in range(3):
        obs, state, *_ = env.step_env(jax.random.key(0), state, act, params)
    np.testing.assert_allclose(np.asarray(state.x), np.asarray(params.bank_traj[-1, 2:3]), atol=2e-4)


def test_onnx_export_refuses_a_conditional_model():
    from qpolicy.onnx_export import convert

    module = UNet(preset_config("tiny", image_size=8, in_channels=1, num_classes=2))
    p = random_params(module, (8, 8, 1))
    den = wrap_denoiser(module, {"params": p}, image_shape=(8, 8, 1), schedule=make_schedule("linear", 100),
                        conditioning=Conditioning(num_classes=2))
    with pytest.raises(ValueError, match="class-conditional"):
        convert(den, 1)


def test_unconditional_fingerprints_and_configs_are_unchanged():
    cfg = TrainConfig(data="digits", preset="tiny", steps=1, out="x")
    from qpolicy.rundir import fingerprint
    import dataclasses

    d = {k: v for k, v in dataclasses.asdict(cfg).items()
         if k not in ("steps", "out", "wandb", "ckpt_every", "log_every", "time_limit_s", "name", "weights_dtype",
                      "conditional", "label_dropout", "guidance_scales")}
    assert cfg.fingerprint() == fingerprint(d)
    assert TrainConfig(data="digits", preset="tiny", steps=1, out="x", conditional=True).fingerprint() != \
        cfg.fingerprint()
    assert "num_classes" not in preset_config("tiny", image_size=8, in_channels=1).to_dict()
    with pytest.raises(ValueError, match="guidance_scales"):
        TrainConfig(data="digits", preset="tiny", steps=1, out="x", conditional=True, guidance_scales=())


def test_by_request_splits_the_evaluation_by_guidance_scale():
    from qpolicy.adaptivity import by_request
    from qpolicy.conditioning import request_table

    keys = image_keys(5, 40)
    g = request_table(COND, keys)["guidance"]
    err = np.where(g == 4.0, 2.0, 1.0) + np.linspace(0, 0.1, 40)
    cost = np.where(g == 4.0, 0.05, 0.02)
    rows = by_request(COND, keys, err, cost, {"mean_schedule": err + 0.5})["scales"]
    assert [r["guidance"] for r in rows] == [1.0, 4.0]
    for r in rows:
        m = g == r["guidance"]
        assert r["n"] == int(m.sum())
        assert r["learned_bops_rel_fp32"] == pytest.approx(cost[m].mean())
        assert r["learned_error"]["mean"] == pytest.approx(err[m].mean())
        assert r["mean_schedule_error"] == pytest.approx(err[m].mean() + 0.5)
        assert r["learned_vs_mean_schedule"]["verdict"] == "better"


def test_shipped_digits16c_is_conditional_and_guided():
    from qpolicy.denoiser import available_models

    assert "digits16c" in available_models()
    den = load_denoiser("digits16c")
    assert den.conditioning is not None and den.conditioning.num_classes == 10
    assert tuple(den.conditioning.guidance_scales) == (1.0, 2.0, 3.0, 5.0)
    x = jnp.ones((2, *den.image_shape), jnp.float32) * 0.1
    keys = jax.random.split(jax.random.key(0), 2)
    e = den.apply(den.params, x, jnp.full((2,), 500, jnp.int32), keys)
    assert e.shape == x.shape and np.isfinite(np.asarray(e)).all()
    # the request acts: other keys (other labels and scales) give another guided eps on the shipped weights
    assert not np.allclose(np.asarray(e), np.asarray(den.apply(den.params, x, jnp.full((2,), 500, jnp.int32),
                                                                 jax.random.split(jax.random.key(1), 2))))
