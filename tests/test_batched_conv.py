"""Per-env convolutions as batched GEMMs (qpolicy.batched_conv): parity with lax's conv, the rule it takes, the env."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import qpolicy.envs as E
from qpolicy.batched_conv import conv
from qpolicy.engine import make_engine

CASES = [  # (image side, C_in, C_out, kernel, strides, padding, dimension numbers)
    (8, 3, 5, 3, (1, 1), "SAME", ("NHWC", "HWIO", "NHWC")),
    (8, 4, 6, 3, (2, 2), "SAME", ("NHWC", "HWIO", "NHWC")),
    (9, 4, 6, 1, (1, 1), "VALID", ("NHWC", "HWIO", "NHWC")),
    (8, 3, 5, 3, (1, 1), ((1, 1), (0, 2)), ("NCHW", "OIHW", "NCHW")),
]


def _operands(case, n=3, B=2, seed=0):
    H, C, O, k, _, _, dn = case
    rng = np.random.default_rng(seed)
    xs, ws = ((n, B, H, H, C), (n, k, k, C, O)) if dn[0] == "NHWC" else ((n, B, C, H, H), (n, O, C, k, k))
    return jnp.asarray(rng.standard_normal(xs), jnp.float32), jnp.asarray(rng.standard_normal(ws), jnp.float32)


def _f64_reference(x, w, case):
    """Each env's convolution alone, in float64 NumPy-side (jax x64 off: computed per env at HIGHEST precision and
    checked against a float64 einsum of explicit patches for the first case)."""
    _, _, _, _, st, pad, dn = case
    return np.stack([np.asarray(lax.conv_general_dilated(x[e], w[e], st, pad, dimension_numbers=dn,
                                                         precision="highest")) for e in range(x.shape[0])])


@pytest.mark.parametrize("impl", ["im2col", "map"])
@pytest.mark.parametrize("case", CASES)
def test_batched_kernels_match_per_env_convolutions(case, impl):
    x, w = _operands(case)
    _, _, _, _, st, pad, dn = case
    f = lambda a, b: conv(a, b, st, pad, impl=impl, dimension_numbers=dn, precision="highest")  # noqa: E731
    ref = _f64_reference(x, w, case)
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x, w), ref, rtol=1e-5, atol=1e-5)
    # a shared input with per-env kernels, and per-env inputs with one shared kernel
    np.testing.assert_allclose(jax.vmap(f, (None, 0))(x[0], w), _f64_reference(jnp.stack([x[0]] * 3), w, case),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(f, (0, None))(x, w[0]), _f64_reference(x, jnp.stack([w[0]] * 3), case),
                               rtol=1e-5, atol=1e-5)
    # unbatched it is lax's own convolution, bit for bit
    np.testing.assert_array_equal(f(x[0], w[0]), lax.conv_general_dilated(x[0], w[0], st, pad, dimension_numbers=dn,
                                                                          precision="highest"))


def test_im2col_matches_explicit_float64_patches():
    """The first case against an independent float64 im2col written with NumPy loops."""
    x, w = _operands(CASES[0], n=2, B=1)
    xs, ws = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, B, H, W, C = xs.shape
    pad = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((n, B, H, W, ws.shape[-1]))
    for e in range(n):
        for i in range(H):
            for j in range(W):
                ref[e, :, i, j] = np.einsum("bhwc,hwco->bo", pad[e, :, i:i + 3, j:j + 3], ws[e])
    got = jax.vmap(lambda a, b: conv(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision="highest"))(x, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _primitives(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [(e.primitive.name, e.params) for e in jaxpr.jaxpr.eqns]


def test_map_rule_is_a_loop_of_plain_convolutions():
    x, w = _operands(CASES[0])
    f = jax.vmap(lambda a, b: conv(a, b, (1, 1), "SAME", impl="map", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    jaxpr = str(jax.make_jaxpr(f)(x, w))
    assert "scan" in jaxpr and "feature_group_count=1" in jaxpr and "feature_group_count=3" not in jaxpr


def test_rule_is_a_batched_gemm_and_grouped_convs_keep_jax_rule():
    x, w = _operands(CASES[0])
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    prims = _primitives(jax.vmap(lambda a, b: conv(a, b, (1, 1), "SAME", **kw)), x, w)
    names = [p for p, _ in prims]
    convs = [q for p, q in prims if p == "conv_general_dilated"]
    assert [q["dimension_numbers"][1] for p, q in prims if p == "dot_general"] == [((0,), (0,))]  # env = GEMM batch
    # the one convolution left is the patches' identity kernel, depthwise over C_in; JAX's rule would group n * C_in
    assert len(convs) == 1 and convs[0]["feature_group_count"] == x.shape[-1] and "dot_general" in names
    # two feature groups: JAX's own rule (a grouped convolution), same numbers as lax
    xg, wg = x[..., :2], jnp.concatenate([w[..., :1, :], w[..., 1:2, :]], axis=-1)[..., :1, :4]
    f = lambda a, b: conv(a, b, (1, 1), "SAME", feature_group_count=2, precision="highest", **kw)  # noqa: E731
    g = lambda a, b: lax.conv_general_dilated(a, b, (1, 1), "SAME", feature_group_count=2, precision="highest",
                                              **kw)  # noqa: E731
    np.testing.assert_allclose(jax.vmap(f)(xg, wg), jax.vmap(g)(xg, wg), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["im2col", "map"])
def test_engine_step_matches_xla_and_is_unchanged_unbatched(tiny_denoiser, impl):
    eng = make_engine(tiny_denoiser, steps=3)
    fast = eng.with_batched_conv(impl)
    assert fast.batched_conv == impl and eng.batched_conv == "xla" and fast.input_means is eng.input_means
    rng = np.random.default_rng(0)
    n, B = 3, 2
    bits = jnp.asarray(np.asarray(eng.qcfg.bit_choices)[rng.integers(0, len(eng.qcfg.bit_choices),
                                                                      (n, eng.num_layers))], jnp.int32)
    keys = jax.random.split(jax.random.key(0), n * B).reshape(n, B)
    x = jax.vmap(eng.initial)(keys)
    step = lambda e: jax.jit(jax.vmap(lambda b, xe, ke: e.step(xe, jnp.asarray(1), ke, b, b)))  # noqa: E731
    a, b = step(eng)(bits, x, keys), step(fast)(bits, x, keys)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    one = lambda e: e.step(x[0], jnp.asarray(1), keys[0], bits[0], bits[0])  # noqa: E731
    np.testing.assert_array_equal(one(fast), one(eng))


def test_env_batched_conv_setting(tiny_denoiser):
    kw = dict(model=tiny_denoiser, num_steps=3, bank_size=8, images_per_env=2)
    xla, fast = E.make_core(**kw, batched_conv="xla"), E.make_core(**kw, batched_conv="map")
    assert fast.engine.batched_conv == "map" and fast.engine.input_means is xla.engine.input_means
    key = jax.random.key(3)
    acts = jnp.asarray(np.random.default_rng(0).integers(0, xla.C, (4, xla.L)), jnp.int32)
    out = [core.jit_step_batch(key, core.jit_reset_batch(key, core.default_params, 4)[1], acts, core.default_params)
           for core in (xla, fast)]
    np.testing.assert_allclose(out[1][2], out[0][2], rtol=1e-4, atol=1e-6)  # rewards
    auto = E.make_core(**kw)
    assert auto.engine.batched_conv == ("map" if jax.default_backend() == "cpu" else "xla")
    # a speed knob: never in a run's fingerprint, so a policy trained under one runs under another
    assert "batched_conv" not in fast.config.fingerprint_dict() and "reward" in fast.config.fingerprint_dict()
    with pytest.raises(ValueError, match="batched_conv.*auto.*xla.*im2col.*map"):
        E.EnvConfig(model=tiny_denoiser, batched_conv="cudnn")
    with pytest.raises(ValueError, match="batched_conv must be one of"):
        xla.engine.with_batched_conv("gemm")
