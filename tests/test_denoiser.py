"""Tests for qpolicy.models (U-Net), qpolicy.denoiser (checkpoints, generate) and qpolicy.train."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpolicy.denoiser import Denoiser, available_models, generate, load_denoiser, save_checkpoint, wrap_denoiser
from qpolicy.io import load_pytree
from qpolicy.layers import trace_layers
from qpolicy.models import PRESETS, UNet, UNetConfig, init_unet, preset_config
from qpolicy.train import TrainConfig, train_denoiser


@functools.partial(jax.jit, static_argnums=0)
def eps_of(module, params, x, t):
    """One compile per (equal) module config, shared by every Denoiser built on it."""
    return module.apply({"params": params}, x, t)


def probe(shape=(8, 8, 1), n=3):
    x = jax.random.normal(jax.random.key(7), (n, *shape))
    t = jnp.array([0, 37, 99][:n] + [50] * max(0, n - 3), jnp.int32)
    return x, t


# --------------------------------------------------------------------------- U-Net
def test_init_unet_tiny_forward_shape():
    cfg = preset_config("tiny", image_size=8, in_channels=1)
    model, params = init_unet(cfg, jax.random.key(0))
    x, t = probe()
    y = eps_of(model, params, x, t)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
    assert float(jnp.std(y)) > 0  # not a constant map
    # eps depends on t (the time embedding is wired in)
    y2 = eps_of(model, params, x, jnp.array([99, 0, 37], jnp.int32))
    assert float(jnp.abs(y - y2).max()) > 1e-6


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size, channels", [(16, 1), (16, 3)])
def test_presets_output_shape(preset, size, channels):
    cfg = preset_config(preset, image_size=size, in_channels=channels)
    model = UNet(cfg)
    x = jnp.zeros((2, size, size, channels))
    t = jnp.zeros((2,), jnp.int32)
    variables = jax.eval_shape(lambda k: model.init(k, x, t), jax.random.key(0))  # shapes only
    out = jax.eval_shape(lambda v: model.apply(v, x, t), variables)
    assert out.shape == x.shape


def test_preset_overrides_and_unknown():
    cfg = preset_config("tiny", image_size=8, in_channels=3, dropout=0.2)
    assert cfg.dropout == 0.2 and cfg.base_channels == PRESETS["tiny"]["base_channels"] and cfg.in_channels == 3
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge", image_size=8, in_channels=1)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(image_size=10, channel_mults=(1, 2, 2)), "image_size"),  # 10 % 4 != 0
        (dict(image_size=2, channel_mults=(1,)), "image_size"),
        (dict(in_channels=2), "in_channels"),
        (dict(in_channels=0), "in_channels"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(channel_mults=(1, 0)), "channel_mults"),
        (dict(base_channels=8, num_groups=3), "num_groups"),
        (dict(base_channels=12, channel_mults=(1, 2), num_groups=8), "num_groups"),  # 8 doesn't divide 12
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_unet_config_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        UNetConfig(**kw)


def test_unet_config_dict_round_trip():
    cfg = preset_config("medium", image_size=32, in_channels=3)
    d = cfg.to_dict()
    assert isinstance(d["channel_mults"], list)
    assert UNetConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="bogus"):
        UNetConfig.from_dict({**d, "bogus": 1})


def test_layer_names_stable_in_call_order(tiny_denoiser):
    den = tiny_denoiser
    layers = trace_layers(den.module, den.variables, den.image_shape)
    paths = [l.path for l in layers]
    assert len(paths) == len(set(paths))
    assert [l.index for l in layers] == list(range(len(layers)))
    wanted = ["conv_in", "down_0/block_0/conv_0", "mid/attn/qkv", "conv_out"]
    for p in wanted:
        assert p in paths, p
    idx = [paths.index(p) for p in wanted]
    assert idx == sorted(idx), f"not in call order: {list(zip(wanted, idx))}"
    assert paths[:2] == ["time/dense_0", "time/dense_1"]  # the time MLP runs before conv_in
    assert paths.index("conv_in") == 2 and paths[-1] == "conv_out"
    kinds = {l.path: l.kind for l in layers}
    assert kinds["conv_in"] == "conv" and kinds["mid/attn/qkv"] == "dense"
    by = {l.path: l for l in layers}
    assert by["conv_in"].weight_shape == (3, 3, 1, 8)
    assert by["conv_in"].macs == 8 * 8 * 8 * 9  # H*W*out * (3*3*in)
    assert den.layers == layers and den.layer_hash == den.metadata["layer_hash"]


# --------------------------------------------------------------------------- checkpoints
def _save(den, out, **kw):
    return save_checkpoint(out, module=den.module, params=den.params, schedule=den.schedule, dataset="npz:/x.npz",
                           image_shape=den.image_shape, train={"steps": 0}, **kw)


def test_checkpoint_round_trip_float32(tiny_denoiser, tmp_path):
    den = tiny_denoiser
    out = _save(den, tmp_path / "ck")
    assert (out / "meta.json").exists() and (out / "weights.msgpack").exists()
    loaded = load_denoiser(out)
    assert isinstance(loaded, Denoiser)
    assert loaded.name == "ck" and loaded.dataset == "npz:/x.npz" and loaded.image_shape == (8, 8, 1)
    assert loaded.layer_hash == den.layer_hash and loaded.module.cfg == den.module.cfg
    np.testing.assert_array_equal(np.asarray(loaded.schedule.alphas_cumprod), np.asarray(den.schedule.alphas_cumprod))
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(den.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x, t = probe()
    np.testing.assert_array_equal(np.asarray(eps_of(loaded.module, loaded.params, x, t)),
                                  np.asarray(eps_of(den.module, den.params, x, t)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"] == {"steps": 0} and meta["weights_dtype"] == "float32"


def test_checkpoint_round_trip_float16(tiny_denoiser, tmp_path):
    den = tiny_denoiser
    out = _save(den, tmp_path / "ck16", weights_dtype="float16", name="half")
    stored = load_pytree(out / "weights.msgpack")
    assert {np.asarray(a).dtype for a in jax.tree_util.tree_leaves(stored)} == {np.dtype(np.float16)}
    loaded = load_denoiser(out)
    assert loaded.name == "half"
    leaves = jax.tree_util.tree_leaves(loaded.params)
    assert {np.dtype(a.dtype) for a in leaves} == {np.dtype(np.float32)}
    max_rel = 0.0
    for a, b in zip(leaves, jax.tree_util.tree_leaves(den.params)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=2**-11, atol=1e-7)  # fp16: 11-bit significand
        max_rel = max(max_rel, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6))))
    assert max_rel > 0  # really went through float16
    x, t = probe()
    y16 = np.asarray(eps_of(loaded.module, loaded.params, x, t))
    y32 = np.asarray(eps_of(den.module, den.params, x, t))
    assert np.abs(y16 - y32).max() < 1e-2 * np.abs(y32).max()


def test_missing_checkpoint_lists_shipped_models(tmp_path):
    shipped = available_models()
    assert "digits16" in shipped
    with pytest.raises(FileNotFoundError) as ei:
        load_denoiser(tmp_path / "nope")
    assert "digits16" in str(ei.value) and "nope" in str(ei.value)
    with pytest.raises(FileNotFoundError, match="digits16"):
        load_denoiser("no_such_model")


@pytest.mark.parametrize("payload", [b"garbage", b"", "half"])
def test_corrupt_weights_raise_value_error(tiny_denoiser, tmp_path, payload):
    out = _save(tiny_denoiser, tmp_path / "ck")
    w = out / "weights.msgpack"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2] if payload == "half" else payload)
    with pytest.raises(ValueError):
        load_denoiser(out)


def test_missing_weights_file(tiny_denoiser, tmp_path):
    out = _save(tiny_denoiser, tmp_path / "ck")
    (out / "weights.msgpack").unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        load_denoiser(out)


def _edit_meta(out, fn):
    p = out / "meta.json"
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("field", ["model_config", "schedule", "image_shape", "format"])
def test_meta_missing_field_named(tiny_denoiser, tmp_path, field):
    out = _save(tiny_denoiser, tmp_path / "ck")
    _edit_meta(out, lambda m: m.pop(field))
    with pytest.raises(ValueError, match=field):
        load_denoiser(out)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m["schedule"].pop("num_timesteps"), "num_timesteps"),
        (lambda m: m.update(arch="transformer"), "arch"),
        (lambda m: m["model_config"].update(in_channels=2), "in_channels"),
        (lambda m: m["model_config"].update(wings=2), "wings"),
        (lambda m: m.update(schedule="linear"), "schedule"),
    ],
)
def test_meta_bad_field_named(tiny_denoiser, tmp_path, edit, field):
    out = _save(tiny_denoiser, tmp_path / "ck")
    _edit_meta(out, edit)
    with pytest.raises(ValueError, match=field):
        load_denoiser(out)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_meta_corrupt_json(tiny_denoiser, tmp_path, text):
    out = _save(tiny_denoiser, tmp_path / "ck")
    (out / "meta.json").write_text(text)
    with pytest.raises(ValueError, match="meta.json"):
        load_denoiser(out)


def test_layer_hash_mismatch(tiny_denoiser, tmp_path):
    out = _save(tiny_denoiser, tmp_path / "ck")
    load_denoiser(out)  # control: the untouched checkpoint loads
    _edit_meta(out, lambda m: m.update(layer_hash="0123456789abcdef"))
    with pytest.raises(ValueError, match="hash"):
        load_denoiser(out)


def test_weights_of_other_architecture_rejected(tiny_denoiser, tmp_path):
    out = _save(tiny_denoiser, tmp_path / "ck")
    _edit_meta(out, lambda m: m["model_config"].update(base_channels=16, num_groups=8))
    with pytest.raises(ValueError):
        load_denoiser(out)


def test_wrap_denoiser_rejects_bad_models(tiny_denoiser):
    den = tiny_denoiser
    with pytest.raises(TypeError, match="Module"):
        wrap_denoiser(lambda x, t: x, den.params, image_shape=(8, 8, 1), schedule=den.schedule)
    with pytest.raises(TypeError, match="Schedule"):
        wrap_denoiser(den.module, den.params, image_shape=(8, 8, 1), schedule={"kind": "linear"})
    with pytest.raises(ValueError, match="image_shape"):
        wrap_denoiser(den.module, den.params, image_shape=(8, 8), schedule=den.schedule)
    with pytest.raises(ValueError):  # params for 1 channel, images with 3
        wrap_denoiser(den.module, den.params, image_shape=(8, 8, 3), schedule=den.schedule)


# --------------------------------------------------------------------------- generate
def test_generate_batching_independent(tiny_denoiser):
    den = tiny_denoiser
    a = generate(den, 5, steps=3, batch_size=8)
    b = generate(den, 5, steps=3, batch_size=2)  # 3 batches, the last one padded
    assert a.shape == (5, 8, 8, 1) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.abs(a[0] - a[1]).max() > 1e-3  # each image has its own noise
    with pytest.raises(ValueError, match="n must be"):
        generate(den, 0)


def test_shipped_digits16():
    den = load_denoiser("digits16")
    assert den.dataset == "digits" and den.name == "digits16" and den.image_shape == (16, 16, 1)
    assert den.schedule.num_timesteps == 1000 and den.metadata["layer_hash"] == den.layer_hash
    a = generate(den, 4, steps=5)
    b = generate(den, 4, steps=5)
    assert a.shape == (4, 16, 16, 1)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a)) and a.min() >= -1.0 and a.max() <= 1.0
    assert a.std() > 0.2  # images, not a constant
    assert np.abs(a[0] - a[1]).max() > 0.1  # different image keys give different images


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(preset="huge"), "preset"),
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(log_every=0), "log_every"),
        (dict(ckpt_every=0), "ckpt_every"),
        (dict(num_timesteps=0), "num_timesteps"),
        (dict(schedule="sigmoid"), "schedule"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_decay=-0.1), "ema_decay"),
        (dict(weights_dtype="bfloat16"), "weights_dtype"),
        (dict(lr=0.0), "lr"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(wandb="cloud"), "wandb"),
    ],
)
def test_train_config_validation_names_field(kw, field):
    base = dict(data="digits", preset="tiny", steps=10, out="/tmp/unused")
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{**base, **kw})


def blobs_npz(path, n=64, size=8, seed=0):
    """n Gaussian blobs at random centres in [-1, 1]: a trivially learnable distribution."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cx, cy = rng.uniform(2, size - 2, n), rng.uniform(2, size - 2, n)
    img = np.exp(-((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2) / 4.0)
    np.savez(path, images=(2 * img - 1).astype(np.float32)[..., None])
    return f"npz:{path}"


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_loss_decreases_and_resume(tmp_path):
    data = blobs_npz(tmp_path / "blobs.npz")
    out = tmp_path / "run"
    # 50 steps in chunks of 20: the last chunk is short, and training must stop exactly at 50
    cfg = TrainConfig(data=data, preset="tiny", steps=50, out=str(out), batch_size=16, lr=2e-3, warmup=5,
                      log_every=20, ckpt_every=1000, ema_decay=0.9, wandb="disabled")
    s1 = train_denoiser(cfg, progress=False)
    assert s1["steps"] == 50
    assert math.isfinite(s1["first_loss"]) and s1["last_loss"] < 0.7 * s1["first_loss"], s1
    for f in ("meta.json", "weights.msgpack", "train_state.msgpack", "metrics.jsonl"):
        assert (out / f).exists(), f
    rows1 = _metrics(out)
    assert [r["step"] for r in rows1] == [20, 40, 50]
    assert rows1[0]["loss"] == pytest.approx(s1["first_loss"]) and rows1[-1]["loss"] == pytest.approx(s1["last_loss"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"]["steps"] == 50 and meta["train"]["complete"] is True and meta["dataset"] == data
    assert int(load_pytree(out / "train_state.msgpack")["step"]) == 50
    den = load_denoiser(out)  # the EMA checkpoint is loadable and usable
    assert den.image_shape == (8, 8, 1) and den.dataset == data

    # same target: nothing left to do, nothing logged (a restart would retrain from step 0)
    meta_before = (out / "meta.json").read_text()
    s_same = train_denoiser(cfg, progress=False)
    assert s_same["steps"] == 50 and s_same["already_complete"] and s_same["first_loss"] is None
    assert _metrics(out) == rows1
    assert (out / "meta.json").read_text() == meta_before  # the training record is kept, not rewritten

    # larger target: continue from step 50, appending to the metrics log
    s2 = train_denoiser(dataclasses.replace(cfg, steps=90), progress=False)
    rows2 = _metrics(out)
    assert [r["step"] for r in rows2] == [20, 40, 50, 70, 90]
    assert rows2[:3] == rows1
    assert s2["steps"] == 90 and s2["first_loss"] == pytest.approx(rows2[3]["loss"])
    assert s2["first_loss"] < 0.7 * s1["first_loss"]  # starts from trained weights, not from scratch
    meta2 = json.loads((out / "meta.json").read_text())
    assert meta2["train"]["steps"] == 90 > meta["train"]["steps"]
    assert int(load_pytree(out / "train_state.msgpack")["step"]) == 90
