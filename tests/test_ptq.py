"""The PTQ toolbox: the W8 regression (bias correction removes the per-channel eps mean shift that broke patches32),
shortcut splitting found in the jaxpr of any model, MSE weight clipping, presets; and real integer execution
matching the simulation within 1 LSB."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qpolicy import QuantConfig, fidelity, make_engine, reference_bank, uniform_bits, wrap_denoiser
from qpolicy.banks import BANK_SEEDS
from qpolicy.diffusion import image_keys, image_noise, make_schedule
from qpolicy.engine import quant_config
from qpolicy.ptq import input_splits, weight_clip_ratios
from qpolicy.quant import WEIGHT_DEFAULT, fake_quant, range_from


class PixelMLP(nn.Module):
    """eps = Dense(C)(silu(Dense(16)(concat(x, x²)) + t-embedding)): the last layer sees post-SiLU (nonzero-mean)
    inputs like a U-Net's conv_out, and the first one a concatenation of differently scaled parts."""

    @nn.compact
    def __call__(self, x, t):
        temb = nn.Dense(16, name="temb")(jnp.asarray(t, jnp.float32)[:, None] / 100.0)
        h = nn.silu(nn.Dense(16, name="dense_0")(jnp.concatenate([x, 30.0 * x ** 2], -1)) + temb[:, None, None, :])
        return nn.Dense(x.shape[-1], name="out")(h)


@pytest.fixture(scope="module")
def mlp():
    m = PixelMLP()
    shape = (4, 4, 3)
    params = m.init(jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,), jnp.int32))
    return wrap_denoiser(m, params, image_shape=shape, schedule=make_schedule("linear", 100), name="mlp")


def _eps_mean_shift(eng, x, bw, ba):
    L = eng.num_layers
    fp = jnp.full((L,), 32, jnp.int32)
    d = np.asarray(eng.eps(x, 0, jnp.full((L,), bw, jnp.int32), jnp.full((L,), ba, jnp.int32)) - eng.eps(x, 0, fp, fp))
    return np.sqrt((d.mean((0, 1, 2)) ** 2).mean())  # per-channel mean of the eps error, rms over channels


@pytest.mark.parametrize("bw,ba", [(8, 32), (6, 32)])
def test_bias_correction_removes_eps_mean_shift(mlp, bw, ba):
    plain = make_engine(mlp, steps=2, qcfg=quant_config("plain"))
    fixed = make_engine(mlp, steps=2, qcfg=quant_config("plain", bias_correction=True, calib_n=16))
    x = image_noise(image_keys(BANK_SEEDS["calib"], 16), 0, mlp.image_shape)  # the step-0 calibration inputs
    before, after = _eps_mean_shift(plain, x, bw, ba), _eps_mean_shift(fixed, x, bw, ba)
    assert before > 0 and after < 0.2 * before, (before, after)
    L = plain.num_layers
    fp = jnp.full((L,), 32, jnp.int32)  # exact at full precision: Q(W) - W = 0
    np.testing.assert_array_equal(np.asarray(fixed.eps(x, 0, fp, fp)), np.asarray(plain.eps(x, 0, fp, fp)))


def test_input_splits_found_in_any_model(mlp, tiny_denoiser):
    assert {mlp.layers[l].path: s for l, s in input_splits(mlp).items()} == {"dense_0": (3, 3)}
    tiny = {tiny_denoiser.layers[l].path: s for l, s in input_splits(tiny_denoiser).items()}
    assert tiny and all(p.startswith(("up_", "time/")) for p in tiny)  # U-Net skip concatenations, sin|cos


def test_split_concat_quantizes_each_part_on_its_own_range(mlp):
    eng = make_engine(mlp, steps=2, qcfg=quant_config("plain", split_concat=True))
    l = next(iter(eng.input_splits))
    x = jnp.concatenate([jnp.linspace(-1, 1, 12).reshape(1, 4, 3), 100 * jnp.ones((1, 4, 3))], -1)
    y = eng.act_quant_fn(jnp.int32(0), jnp.full((eng.num_layers,), 4, jnp.int32))(l, x)
    small = np.asarray(y[..., :3])  # 4 bits over [-1, 1] alone: step 2/15, not 101/15
    assert np.abs(small - np.asarray(x[..., :3])).max() <= 1 / 15 + 1e-6


def test_weight_clipping_never_worse_and_clips_outliers():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32).at[0, 0].set(12.0)  # one outlier in channel 0
    r = weight_clip_ratios(w, WEIGHT_DEFAULT, (4, 8, 32))
    assert r.shape == (3, 1, 8) and float(r[2].min()) == 1.0
    assert float(r[0, 0, 0]) < 1.0  # 4 bits: clip the outlier's channel
    base = range_from(w, WEIGHT_DEFAULT)
    for c, b in enumerate((4, 8)):
        e_clip = ((w - fake_quant(w, b, WEIGHT_DEFAULT, absmax=r[c] * base)) ** 2).sum(0)
        e_full = ((w - fake_quant(w, b, WEIGHT_DEFAULT)) ** 2).sum(0)
        assert np.all(np.asarray(e_clip) <= np.asarray(e_full) + 1e-7)


def test_presets_and_quantizer_block(mlp):
    plain = make_engine(mlp, steps=2, qcfg=quant_config("plain"))
    assert not plain.input_splits and not plain.input_means and not plain.clip_ratios
    assert plain.qcfg.preset == "plain" and quant_config().preset == "ptq" == QuantConfig().preset
    block = quant_config("ptq-smooth").quantizer_block()
    assert block["preset"] == "ptq-smooth" and block["split_concat"] and block["bias_correction"]
    assert block["weight_clipping"] and block["smoothquant"] and block["smooth_min_bits"] == 8
    assert not quant_config().quantizer_block()["smoothquant"]
    assert quant_config("ptq", act_ranges="static").preset == "ptq"  # static ranges: weights split, activations not
    assert quant_config("ptq-smooth", act_ranges="static").preset == "ptq"  # static ranges leave SmoothQuant out
    with pytest.raises(ValueError, match="preset must be one of"):
        quant_config("best")


# ------------------------------------------------------------------------------------------------ integer path
def test_int8_accumulation_equals_float64_reference():
    rng = np.random.default_rng(1)
    conv = nn.Conv(5, (3, 3), strides=(2, 2), padding="SAME")
    q_in = jnp.asarray(rng.integers(0, 256, (2, 7, 7, 4)), jnp.int32)
    zp = jnp.asarray(rng.integers(0, 256, (2, 1, 1, 1)), jnp.int32)
    q_w = jnp.asarray(rng.integers(-127, 128, (3, 3, 4, 5)), jnp.int32)
    bound = conv.bind({"params": {"kernel": jnp.zeros((3, 3, 4, 5)), "bias": jnp.zeros(5)}})
    acc = fidelity.int_accumulate(bound, q_in, zp, q_w)
    ref = lax.conv_general_dilated(np.asarray(q_in - zp, np.float64), np.asarray(q_w, np.float64), (2, 2), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(ref).astype(np.int64))


@pytest.mark.parametrize("extra", [pytest.param({}, id="ptq"), pytest.param(
    {"clip_objective": "output", "reconstruction": True, "recon_method": "gptq", "recon_bits": (8,), "calib_n": 4},
    id="oclip-gptq", marks=pytest.mark.slow), pytest.param(
    {"act_clip": "mse", "smoothquant": True, "reconstruction": True, "recon_bits": (8,), "recon_iters": 10,
     "calib_n": 4}, id="all", marks=pytest.mark.slow)])  # all, oclip-gptq: ~3 CPU-minutes each (calibrations, compiles)
def test_integer_execution_within_one_lsb(tiny_denoiser, extra):
    eng = make_engine(tiny_denoiser, steps=2, qcfg=quant_config("ptq", **extra))
    bank = reference_bank(eng, "eval", 2)
    bw, ba = uniform_bits(eng, 8, 8)
    bw[1, :3] = 16  # a layer above 8 bits stays on the float simulation at that step
    res = fidelity.check(eng, bank, bw, ba)
    assert res["layers_int"] == len(fidelity.eligible(eng)) > 0
    assert res["max_lsb"] <= 1.0
    assert all(r["steps"] == (1 if r["index"] < 3 else 2) for r in res["layers"])
    assert res["final_error_int_vs_sim"] < 0.05
    with pytest.raises(ValueError, match="dynamic, asymmetric, per-tensor"):
        fidelity.check(make_engine(tiny_denoiser, steps=2, qcfg=quant_config("ptq", act_ranges="static")), bank,
                       bw, ba)


@pytest.mark.slow
def test_cli_fidelity_digits16_within_one_lsb(capsys):
    import json

    from qpolicy.cli import main

    assert main(["fidelity", "--model", "digits16", "--w", "8", "--a", "8", "--n", "2", "--steps", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["layers_int"] == res["layers_total"] == 43 and res["max_lsb"] <= 1.0


# ------------------------------------------------------------------------------------------------ percentile, MSE
# activation clipping, SmoothQuant, AdaRound
def test_percentile_range_equals_numpy():
    from qpolicy.quant import percentile_range

    x = np.random.default_rng(3).standard_t(2, (5, 7, 11)).astype(np.float32)  # heavy tails
    for p in (50.0, 90.0, 99.0, 99.99, 100.0):
        np.testing.assert_allclose(np.asarray(percentile_range(x, p)), np.percentile(x.astype(np.float64),
                                                                                     [100 - p, p]), rtol=1e-6)
    with pytest.raises(ValueError, match="act_percentile"):
        percentile_range(x, 40.0)


def test_act_clip_ratios_pick_the_mse_optimal_clip(mlp):
    """A layer input with one outlier per image: at 2 bits the MSE ratio clips it (< 1), at 16 bits it does not, and
    the clipped quantizer's error is no larger than min/max's on the same input."""
    from qpolicy.ptq import ACT_CLIP_GRID, quant_act

    eng = make_engine(mlp, steps=2, qcfg=quant_config("plain", act_clip="mse", calib_n=8))
    r = eng.act_ratios[eng.num_layers - 1]  # `out`: post-SiLU input, (buckets, parts, C)
    choices = list(eng.qcfg.bit_choices)
    assert r.shape == (eng.qcfg.range_buckets, 1, len(choices))
    assert set(np.unique(np.asarray(r))) <= set(np.float32(ACT_CLIP_GRID))
    assert float(r[:, 0, choices.index(2)].max()) < 1.0 and float(r[:, 0, choices.index(32)].min()) == 1.0
    v = jnp.asarray(np.random.default_rng(0).standard_normal(256), jnp.float32).at[0].set(20.0)
    lo, hi = v.min(), v.max()
    errs = [float(jnp.sum((quant_act(v, 3, eng.qcfg.a_spec, lo, hi, c) - v) ** 2)) for c in ACT_CLIP_GRID]
    assert min(errs) < errs[-1]  # the outlier case the search is for


def test_smoothquant_keeps_fp_output_and_flattens_channel_ranges(mlp):
    from qpolicy.ptq import smooth_factors

    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 6)) * np.array([1, 1, 50, 1, 0.1, 1])  # one outlier channel
    w = rng.standard_normal((6, 5))
    s = np.asarray(smooth_factors(jnp.asarray(np.abs(x).max(0), jnp.float32), jnp.asarray(w, jnp.float32), 0.5),
                   np.float64)
    np.testing.assert_allclose((x / s) @ (s[:, None] * w), x @ w, rtol=1e-12)  # exact migration in float64
    spread = lambda a: np.abs(a).max(0).max() / np.abs(a).max(0).min()  # noqa: E731
    assert spread(x / s) < spread(x)
    smooth = make_engine(mlp, steps=2, qcfg=quant_config("plain", smoothquant=True, smooth_alpha=0.5, calib_n=8))
    plain = make_engine(mlp, steps=2, qcfg=quant_config("plain"))
    assert smooth.smooth and smooth.qcfg.quantizer_block()["smoothquant"]
    xi = image_noise(image_keys(BANK_SEEDS["calib"], 4), 0, mlp.image_shape)
    fp = jnp.full((plain.num_layers,), 32, jnp.int32)
    np.testing.assert_array_equal(np.asarray(smooth.eps(xi, 0, fp, fp)), np.asarray(plain.eps(xi, 0, fp, fp)))
    l = next(iter(smooth.smooth))  # below smooth_min_bits (8) the layer is not smoothed: plain weights exactly
    w = jnp.asarray(mlp.params[mlp.layers[l].path]["kernel"])
    np.testing.assert_array_equal(np.asarray(smooth.quantize_weight(l, w, jnp.int32(4))),
                                  np.asarray(plain.quantize_weight(l, w, jnp.int32(4))))
    assert not np.array_equal(np.asarray(smooth.quantize_weight(l, w, jnp.int32(8))),
                              np.asarray(plain.quantize_weight(l, w, jnp.int32(8))))
    e8, ref = jnp.full((plain.num_layers,), 8, jnp.int32), np.asarray(plain.eps(xi, 0, fp, fp))
    assert np.linalg.norm(np.asarray(smooth.eps(xi, 0, e8, e8)) - ref) < 0.03 * np.linalg.norm(ref)  # W8A8 near FP


def test_adaround_beats_nearest_and_stays_on_floor_or_ceil():
    from qpolicy.reconstruct import adaround

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 16)) @ rng.standard_normal((16, 16)), jnp.float32)  # correlated inputs
    w = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    scale = jnp.broadcast_to(jnp.abs(w).max(0, keepdims=True) / 7, w.shape)  # 4 bits, per output channel
    wq, e_ada, e_near = adaround(x, w, scale, -7.0, 7.0, iters=300)
    assert float(e_ada) < 0.8 * float(e_near)
    code = np.asarray(wq / scale)
    np.testing.assert_allclose(code, np.round(code), atol=1e-4)
    fl = np.floor(np.asarray(w / scale))
    assert np.all((np.round(code) == fl) | (np.round(code) == fl + 1))


def test_new_switches_round_trip_and_keep_bits_traced(mlp):
    import json

    from qpolicy.schedule import BitSchedule

    qcfg = quant_config("ptq", act_clip="mse", smoothquant=True, reconstruction=True, recon_bits=(4,), recon_iters=20,
                        calib_n=8)
    eng = make_engine(mlp, steps=2, qcfg=qcfg)
    assert eng.act_ratios and eng.smooth and eng.recon
    bw, ba = uniform_bits(eng, 4, 8)
    sched = BitSchedule.for_denoiser(mlp, eng.sampler, bw, ba, quantizer=qcfg.quantizer_block())
    back = BitSchedule.from_dict(json.loads(json.dumps(sched.to_dict()))).quantizer
    for k in ("act_clip", "smoothquant", "reconstruction", "recon_bits", "act_percentile", "attn_matmuls", "preset"):
        assert back[k] == json.loads(json.dumps(qcfg.quantizer_block()[k])), k
    assert back["preset"] == "custom" and back["recon_bits"] == [4]
    bank = reference_bank(eng, "eval", 2)
    errs = {}
    for b in (2, 4, 8, 32):  # reconstructed (4) and plain choices: one compile
        errs[b] = float(eng.errors_fn(bank.keys, bank.traj, jnp.full(bw.shape, b, jnp.int32),
                                      jnp.full(bw.shape, 8, jnp.int32))[0][-1].mean())
    assert eng.errors_fn._cache_size() == 1
    assert errs[2] > errs[4] > errs[8]
    with pytest.raises(ValueError, match="recon_bits must be an integer >= 2 and <= 8"):
        quant_config("ptq", recon_bits=(16,))
    with pytest.raises(ValueError, match="act_clip must be one of"):
        quant_config("ptq", act_clip="kl")
    assert not quant_config("ptq", smoothquant=True, act_ranges="static").smoothquant  # static: no migration


def test_output_clipping_lowers_layer_output_error(mlp):
    """clip_objective="output": on the calibration inputs' second moments, every layer's output error at every searched
    bit choice is no larger than under the weight-MSE ratios, strictly lower somewhere at 4 bits; the constant-input
    time layer (its error is all absorbed by the per-step bias correction) keeps the weight-MSE ratios; choices above
    8 bits keep them too; the switch is recorded in the quantizer block and needs weight_clipping."""
    from qpolicy.reconstruct import layer_grams

    wmse = make_engine(mlp, steps=2, qcfg=quant_config("ptq", calib_n=8))
    out = make_engine(mlp, steps=2, qcfg=quant_config("ptq", clip_objective="output", calib_n=8))
    assert out.qcfg.quantizer_block()["clip_objective"] == "output" and out.qcfg.preset == "custom"
    assert wmse.qcfg.quantizer_block()["clip_objective"] == "weight"
    layers = [lay.index for lay in mlp.layers]
    grams = layer_grams(mlp, out.sampler, layers, n=8, center=True)
    choices = list(out.qcfg.bit_choices)
    gains = {}
    for l in layers:
        w = jnp.asarray(mlp.params[mlp.layers[l].path]["kernel"], jnp.float32)
        for b in (2, 3, 4, 5, 6, 8):
            err = lambda eng: float(jnp.sum((grams[l] @ (d := eng.quantize_weight(l, w, jnp.int32(b)) - w)) * d))
            e_out, e_w = err(out), err(wmse)
            assert e_out <= e_w * (1 + 1e-5) + 1e-12, (l, b, e_out, e_w)
            gains[(l, b)] = e_out / max(e_w, 1e-30)
    assert min(g for (l, b), g in gains.items() if b == 4) < 0.9
    temb = next(lay.index for lay in mlp.layers if lay.path == "temb")
    np.testing.assert_array_equal(np.asarray(out.clip_ratios[(temb, "kernel", 0)]),
                                  np.asarray(wmse.clip_ratios[(temb, "kernel", 0)]))
    for k, r in out.clip_ratios.items():  # above 8 bits: the weight-MSE ratios
        hi = [choices.index(b) for b in choices if b > 8]
        np.testing.assert_array_equal(np.asarray(r)[hi], np.asarray(wmse.clip_ratios[k])[hi])
    with pytest.raises(ValueError, match="needs weight_clipping"):
        quant_config("plain", clip_objective="output")


def test_gptq_beats_nearest_on_grid_and_runs_in_the_engine(mlp):
    """GPTQ (recon_method="gptq"): lower output error than nearest rounding on correlated inputs, every entry an
    integer code within the bounds of the fixed grid; in the engine the reconstructed 4-bit weights are used and 8
    (not in recon_bits) is left to nearest rounding."""
    from qpolicy.reconstruct import gptq

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((512, 32)) @ rng.standard_normal((32, 32)), jnp.float32)  # correlated inputs
    w = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
    scale = jnp.broadcast_to(jnp.abs(w).max(0, keepdims=True) / 7, w.shape)  # 4 bits, per output channel
    wq, e, e_near = gptq(x.T @ x / x.shape[0], w, scale, -7.0, 7.0)
    assert float(e) < 0.8 * float(e_near)
    code = np.asarray(wq / scale)
    np.testing.assert_allclose(code, np.round(code), atol=1e-4)
    assert np.abs(np.round(code)).max() <= 7
    eng = make_engine(mlp, steps=2, qcfg=quant_config("ptq", reconstruction=True, recon_method="gptq", recon_bits=(4,),
                                                      calib_n=8))
    assert eng.recon and eng.qcfg.quantizer_block()["recon_method"] == "gptq"
    assert quant_config("ptq-gptq").preset == "ptq-gptq" and quant_config("ptq-recon").recon_method == "adaround"
    l = next(iter(eng.recon))
    w = jnp.asarray(mlp.params[mlp.layers[l].path]["kernel"])
    np.testing.assert_array_equal(np.asarray(eng.quantize_weight(l, w, jnp.int32(4))), np.asarray(eng.recon[l][0]))
    with pytest.raises(ValueError, match="recon_method must be one of"):
        quant_config("ptq", recon_method="brecq")
