"""Tests for qpolicy.diffusion: schedule closed forms, q(x_t|x_0), the loss, and DDPM/DDIM samplers
against an independent float64 NumPy reference driven by the same per-image noise."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpolicy.diffusion import (
    Schedule,
    betas_for,
    eps_loss,
    image_keys,
    image_noise,
    make_sampler,
    make_schedule,
    q_sample,
    sample,
    sampler_step,
    sampler_timesteps,
    schedule_from_dict,
)

T = 100  # training timesteps of the small schedules used below
SHAPE = (4, 4, 1)  # tiny image shape for sampler tests


# --------------------------------------------------------------------------- schedules
def test_linear_betas_endpoints_and_monotone():
    s = make_schedule("linear", 1000)
    b = np.asarray(s.betas, np.float64)
    assert b.shape == (1000,)
    np.testing.assert_allclose(b[0], 1e-4, rtol=1e-6)
    np.testing.assert_allclose(b[-1], 0.02, rtol=1e-6)
    assert np.all(np.diff(b) > 0)
    abar = np.asarray(s.alphas_cumprod, np.float64)
    assert np.all(np.diff(abar) < 0) and 0 < abar[-1] < abar[0] < 1
    np.testing.assert_allclose(abar, np.cumprod(1 - b), rtol=1e-5)
    assert s.num_timesteps == 1000
    assert s.to_dict() == {"kind": "linear", "num_timesteps": 1000}


def test_linear_custom_endpoints():
    b = betas_for("linear", 10, beta_start=0.001, beta_end=0.1)
    np.testing.assert_allclose(b, np.linspace(0.001, 0.1, 10))


@pytest.mark.parametrize("num_timesteps", [50, 1000])
def test_cosine_alphas_cumprod_closed_form(num_timesteps):
    s_off = 0.008
    sched = make_schedule("cosine", num_timesteps)
    betas = np.asarray(sched.betas, np.float64)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    f = lambda u: np.cos((u + s_off) / (1 + s_off) * math.pi / 2) ** 2
    # alphas_cumprod[t] is the product over steps 0..t, i.e. the closed form at (t + 1) / T
    expected = f((np.arange(num_timesteps) + 1) / num_timesteps) / f(0.0)
    clipped = betas >= 0.999 - 1e-7
    assert np.all(betas <= 0.999 + 1e-7) and np.all(betas >= 0)
    assert clipped[-1], "the last cosine beta (abar -> 0) must hit the 0.999 clip"
    ok = ~np.maximum.accumulate(clipped)  # the closed form holds before the first clipped step
    assert ok.sum() >= num_timesteps - 1
    np.testing.assert_allclose(abar[ok], expected[ok], rtol=2e-4, atol=1e-7)
    # with the clip, the last step keeps 0.1% of the previous abar
    np.testing.assert_allclose(abar[-1], abar[-2] * (1 - 0.999), rtol=1e-3)
    np.testing.assert_allclose(abar, np.cumprod(1 - betas), rtol=1e-5, atol=1e-9)
    assert np.all(np.diff(abar) < 0)
    assert sched.kind == "cosine"


def test_schedule_dict_round_trip_and_missing_field():
    s = make_schedule("cosine", 30)
    s2 = schedule_from_dict(s.to_dict())
    assert isinstance(s2, Schedule) and s2.kind == "cosine"
    np.testing.assert_array_equal(np.asarray(s2.betas), np.asarray(s.betas))
    with pytest.raises(ValueError, match="num_timesteps"):
        schedule_from_dict({"kind": "linear"})
    with pytest.raises(ValueError, match="kind"):
        schedule_from_dict({"num_timesteps": 10})


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: make_schedule("quadratic", 10), "schedule kind"),
        (lambda: make_schedule("linear", 1), "num_timesteps"),
        (lambda: make_sampler(make_schedule("linear", 10), "euler", 5), "sampler kind"),
        (lambda: make_sampler(make_schedule("linear", 10), "ddim", 5, eta=-0.1), "eta"),
        (lambda: make_sampler(make_schedule("linear", 10), "ddim", 11), "steps"),
        (lambda: make_sampler(make_schedule("linear", 10), "ddpm", 0), "steps"),
    ],
)
def test_bad_inputs_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# --------------------------------------------------------------------------- q_sample / loss
def test_q_sample_exact_for_given_noise():
    sched = make_schedule("linear", T)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (3, 2, 2, 1)).astype(np.float32)
    noise = rng.standard_normal((3, 2, 2, 1)).astype(np.float32)
    t = np.array([0, 50, 99])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t][:, None, None, None]
    expected = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    got = np.asarray(q_sample(sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_q_sample_mean_and_variance():
    sched = make_schedule("cosine", T)
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    noise = jax.random.normal(jax.random.key(1), (n, 1))
    for t_val in (10, 60):
        t = jnp.full((n,), t_val)
        x = np.asarray(q_sample(sched, x0, t, noise), np.float64)
        abar = float(sched.alphas_cumprod[t_val])
        mean, var = math.sqrt(abar) * 0.7, 1 - abar
        # 5-sigma statistical tolerances: SE(mean) = sqrt(var/n), SE(var) ~= var * sqrt(2/n)
        assert abs(x.mean() - mean) < 5 * math.sqrt(var / n)
        assert abs(x.var() - var) < 5 * var * math.sqrt(2 / n)


def test_eps_loss_oracle_zero_and_null_predictor_one():
    sched = make_schedule("linear", T)
    x0 = jax.random.uniform(jax.random.key(2), (256, 4, 4, 1), minval=-1, maxval=1)

    def oracle(x_t, t):  # recovers the exact noise from x_t because it knows x_0
        a = sched.alphas_cumprod[t][:, None, None, None]
        return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    assert float(eps_loss(oracle, sched, x0, jax.random.key(3))) < 1e-6
    null = float(eps_loss(lambda x_t, t: jnp.zeros_like(x_t), sched, x0, jax.random.key(3)))
    assert abs(null - 1.0) < 0.05  # E[z^2] over 4096 normals


# --------------------------------------------------------------------------- timesteps
def test_sampler_timesteps():
    ts = sampler_timesteps(1000, 20)
    assert ts.shape == (20,)
    assert ts[0] == 999 and ts[-1] == 0
    assert np.all(np.diff(ts) < 0)
    assert len(np.unique(ts)) == 20
    np.testing.assert_array_equal(sampler_timesteps(10, 10), np.arange(9, -1, -1))
    np.testing.assert_array_equal(sampler_timesteps(10, 1), [0])
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="steps"):
            sampler_timesteps(1000, bad)


def test_sampler_arrays_and_to_dict():
    sched = make_schedule("linear", T)
    smp = make_sampler(sched, "ddim", 5, eta=0.5, clip_x0=False)
    assert smp.num_steps == 5
    d = smp.to_dict()
    assert d["kind"] == "ddim" and d["eta"] == 0.5 and d["clip_x0"] is False and d["order"] == "descending"
    assert d["timesteps"] == [int(t) for t in sampler_timesteps(T, 5)]
    abar = np.asarray(sched.alphas_cumprod)
    np.testing.assert_allclose(np.asarray(smp.abar), abar[d["timesteps"]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(smp.abar_prev), np.append(abar[d["timesteps"][1:]], 1.0), rtol=1e-5)
    assert float(smp.sigma[-1]) == 0.0 and np.all(np.asarray(smp.sigma[:-1]) > 0)
    assert make_sampler(sched, "ddpm", 5, eta=0.3).eta == 1.0  # DDPM is DDIM with eta = 1


# --------------------------------------------------------------------------- samplers vs NumPy reference
def eps_analytic(x, t):
    """Fixed analytic 'denoiser' eps(x, t) = 0.1 x + 0.01 t / T (works for jax and numpy)."""
    t = t.reshape((-1,) + (1,) * (x.ndim - 1)) if np.ndim(t) > 0 else t
    return 0.1 * x + 0.01 * t / T


def ref_timesteps(num_timesteps, steps):
    if steps == 1:
        return [0]
    return [int(round(j * (num_timesteps - 1) / (steps - 1))) for j in range(steps)][::-1]


def ref_sample(kind, steps, keys, shape, *, eta=0.0, clip=True):
    """float64 reference. DDPM: ancestral sampling with the posterior q(x_prev | x_t, x0_hat) of the
    respaced chain (beta_i = 1 - abar_t / abar_prev). DDIM: Song et al. eq. (12) with sigma from eq. (16).
    x0_hat is clipped to [-1, 1] when ``clip`` (for DDIM, eps is then re-derived from the clipped x0_hat,
    as the implementation documents). Noise: stream 0 = x_T, stream i + 1 = step i."""
    abar_all = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    ts = ref_timesteps(T, steps)
    x = np.asarray(image_noise(keys, 0, shape), np.float64)
    traj = []
    for i, t in enumerate(ts):
        a = abar_all[t]
        a_prev = abar_all[ts[i + 1]] if i + 1 < len(ts) else 1.0
        e = eps_analytic(x, float(t))
        x0 = (x - np.sqrt(1 - a) * e) / np.sqrt(a)
        if clip:
            x0 = np.clip(x0, -1, 1)
        z = np.asarray(image_noise(keys, i + 1, shape), np.float64)
        if kind == "ddpm":
            beta = 1 - a / a_prev
            mean = np.sqrt(a_prev) * beta / (1 - a) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
            var = beta * (1 - a_prev) / (1 - a)
            x = mean + (np.sqrt(var) * z if i + 1 < len(ts) else 0.0)
        else:
            if clip:
                e = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
            sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * e + sigma * z
        traj.append(x)
    return x, np.stack(traj)


def run_impl(kind, steps, keys, *, eta=0.0, clip=True, trajectory=False):
    smp = make_sampler(make_schedule("linear", T), kind, steps, eta=eta, clip_x0=clip)
    return sample(lambda x, t, i: eps_analytic(x, t), smp, keys, SHAPE, return_trajectory=trajectory)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "kind, steps, eta, clip",
    [
        ("ddpm", 10, 1.0, True),
        ("ddpm", 10, 1.0, False),
        ("ddpm", T, 1.0, True),  # every training step: the un-respaced DDPM chain
        ("ddim", 10, 0.0, True),
        ("ddim", 10, 0.0, False),
        ("ddim", 7, 0.5, True),
        ("ddim", 7, 0.5, False),
        ("ddim", 1, 0.0, True),
    ],
)
def test_sampler_matches_numpy_reference(kind, steps, eta, clip):
    keys = image_keys(0, 6)
    x_impl, traj = run_impl(kind, steps, keys, eta=eta, clip=clip, trajectory=True)
    x_ref, traj_ref = ref_sample(kind, steps, keys, SHAPE, eta=eta, clip=clip)
    assert x_impl.shape == (6, *SHAPE) and traj.shape == (steps, 6, *SHAPE)
    assert rel_err(x_impl, x_ref) < 1e-5
    assert rel_err(traj, traj_ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x_impl))
    if clip:
        assert np.abs(np.asarray(x_impl)).max() <= 1.0 + 1e-6  # last step returns the clipped x0_hat


def test_reference_is_sensitive():
    """Guard the guard: the reference distinguishes samplers, eta, and clipping on these inputs."""
    keys = image_keys(0, 6)
    base, _ = ref_sample("ddim", 10, keys, SHAPE, eta=0.0, clip=True)
    for other in (ref_sample("ddpm", 10, keys, SHAPE, clip=True)[0],
                  ref_sample("ddim", 10, keys, SHAPE, eta=0.5, clip=True)[0],
                  ref_sample("ddim", 10, keys, SHAPE, eta=0.0, clip=False)[0]):
        assert rel_err(other, base) > 1e-2


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_equals_ddpm(clip):
    keys = image_keys(3, 5)
    a = run_impl("ddim", 8, keys, eta=1.0, clip=clip)
    b = run_impl("ddpm", 8, keys, clip=clip)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _chain_from(x_T, smp, keys):
    x = x_T
    for i in range(smp.num_steps):
        t = jnp.full((x.shape[0],), smp.timesteps[i])
        x = sampler_step(smp, x, eps_analytic(x, t), jnp.asarray(i), keys)
    return np.asarray(x)


def test_ddim_eta0_ignores_step_noise():
    sched = make_schedule("linear", T)
    x_T = image_noise(image_keys(0, 4), 0, SHAPE)  # x_T fixed; only the per-step noise keys change
    keys_a, keys_b = image_keys(1, 4), image_keys(2, 4)
    det = make_sampler(sched, "ddim", 6, eta=0.0)
    np.testing.assert_array_equal(_chain_from(x_T, det, keys_a), _chain_from(x_T, det, keys_b))
    sto = make_sampler(sched, "ddim", 6, eta=0.5)  # control: with eta > 0 the step noise matters
    assert np.abs(_chain_from(x_T, sto, keys_a) - _chain_from(x_T, sto, keys_b)).max() > 1e-3


# --------------------------------------------------------------------------- noise streams / determinism
def test_image_noise_and_keys_contract():
    keys = image_keys(0, 8)
    assert keys.shape == (8,)
    np.testing.assert_array_equal(jax.random.key_data(image_keys(0, 4, offset=4)), jax.random.key_data(keys[4:]))
    n0 = np.asarray(image_noise(keys, 0, SHAPE))
    n1 = np.asarray(image_noise(keys, 1, SHAPE))
    assert n0.shape == (8, *SHAPE) and n0.dtype == np.float32
    assert not np.allclose(n0, n1)  # streams differ
    assert not np.allclose(n0[0], n0[1])  # images differ
    np.testing.assert_array_equal(np.asarray(image_noise(keys[3:5], 0, SHAPE)), n0[3:5])  # per-image
    assert not np.allclose(np.asarray(image_noise(image_keys(1, 8), 0, SHAPE)), n0)  # seed matters


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_sample_deterministic_and_batch_independent_analytic(kind):
    keys = image_keys(5, 8)
    a = np.asarray(run_impl(kind, 6, keys))
    np.testing.assert_array_equal(a, np.asarray(run_impl(kind, 6, keys)))
    assert np.abs(a - np.asarray(run_impl(kind, 6, image_keys(6, 8)))).max() > 1e-2
    parts = np.concatenate([np.asarray(run_impl(kind, 6, keys[:4])), np.asarray(run_impl(kind, 6, keys[4:8]))])
    np.testing.assert_allclose(parts, a, rtol=0, atol=1e-6)


def test_sample_with_tiny_denoiser(tiny_denoiser):
    den = tiny_denoiser
    smp = make_sampler(den.schedule, "ddpm", 4)
    run = jax.jit(lambda keys: sample(lambda x, t, i: den(x, t), smp, keys, den.image_shape))
    keys = image_keys(0, 8)
    a = np.asarray(run(keys))
    assert a.shape == (8, 8, 8, 1) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, np.asarray(run(keys)))
    assert np.abs(a - np.asarray(run(image_keys(1, 8)))).max() > 1e-3
    parts = np.concatenate([np.asarray(run(keys[:4])), np.asarray(run(keys[4:8]))])
    np.testing.assert_allclose(parts, a, rtol=0, atol=1e-5)
