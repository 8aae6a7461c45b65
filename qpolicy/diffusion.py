"""Diffusion math: beta schedules, q(x_t | x_0), the eps-prediction loss, DDPM and DDIM samplers.

Every sampler is a pure step ``x_prev = sampler_step(sampler, x_t, eps, i, key)`` over step
index ``i`` (0 = the noisiest step). :func:`sample` drives it with ``lax.scan`` and takes the
denoiser call as an argument, so the quantized sampler reuses exactly the same step.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")


@flax.struct.dataclass
class Schedule:
    """Forward-process schedule over the training timesteps 0..T-1 (float32 arrays of shape (T,))."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default="linear")

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_timesteps": self.num_timesteps}


def betas_for(kind: str, num_timesteps: int = 1000, *, beta_start: float = 1e-4, beta_end: float = 0.02,
              cosine_s: float = 0.008) -> np.ndarray:
    """float64 betas. linear: DDPM (Ho et al. 2020); cosine: improved DDPM (Nichol & Dhariwal 2021),
    betas clipped at 0.999."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if kind == "cosine":
        s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((s + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        return np.clip(1 - abar[1:] / abar[:-1], 0.0, 0.999)
    raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {kind!r}")


def make_schedule(kind: str = "linear", num_timesteps: int = 1000, **kw) -> Schedule:
    betas = betas_for(kind, num_timesteps, **kw)
    abar = np.cumprod(1.0 - betas)
    return Schedule(betas=jnp.asarray(betas, jnp.float32), alphas_cumprod=jnp.asarray(abar, jnp.float32), kind=kind)


def schedule_from_dict(d: dict) -> Schedule:
    try:
        return make_schedule(d["kind"], int(d["num_timesteps"]))
    except KeyError as e:
        raise ValueError(f"schedule metadata lacks field {e}; expected keys 'kind' and 'num_timesteps'") from None


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, with t: (B,) int timesteps."""
    abar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def eps_loss(eps_fn: Callable, schedule: Schedule, x0: jax.Array, key: jax.Array) -> jax.Array:
    """Simple DDPM loss E ||eps - eps_theta(x_t, t)||^2 with t uniform over the training steps.

    ``eps_fn(x_t, t) -> eps_hat``. Returns a scalar (mean over all elements)."""
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, schedule.num_timesteps)
    noise = jax.random.normal(kn, x0.shape, x0.dtype)
    return jnp.mean((eps_fn(q_sample(schedule, x0, t, noise), t) - noise) ** 2)


@flax.struct.dataclass
class Sampler:
    """A sampler over a descending subsequence of training timesteps (arrays of shape (S,)).

    timesteps[i] is the model's t at step i; abar[i] = alphas_cumprod[t_i];
    abar_prev[i] = alphas_cumprod[t_{i+1}] (1.0 after the last step); sigma[i] is the std of the
    fresh noise added at step i (0 at the last step)."""

    timesteps: jax.Array
    abar: jax.Array
    abar_prev: jax.Array
    sigma: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default="ddim")
    eta: float = flax.struct.field(pytree_node=False, default=0.0)
    clip_x0: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.num_steps, "eta": self.eta, "clip_x0": self.clip_x0,
                "timesteps": [int(t) for t in np.asarray(self.timesteps)], "order": "descending"}


def sampler_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced descending subsequence of num_steps training timesteps ending at 0."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}] (the training timesteps), got {num_steps}")
    ts = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    return ts[::-1].copy()


def make_sampler(schedule: Schedule, kind: str = "ddim", num_steps: int = 20, *, eta: float = 0.0,
                 clip_x0: bool = True) -> Sampler:
    """DDPM ancestral (posterior variance of the respaced chain) or DDIM(eta) over ``num_steps`` steps."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler kind must be one of {SAMPLERS}, got {kind!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = sampler_timesteps(schedule.num_timesteps, num_steps)
    abar_all = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
    abar = abar_all[ts]
    abar_prev = np.append(abar_all[ts[1:]], 1.0)
    # Posterior std of the respaced chain; DDPM is DDIM with eta = 1.
    post = np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    sigma = (1.0 if kind == "ddpm" else eta) * post
    sigma[-1] = 0.0
    f = lambda a: jnp.asarray(a, jnp.float32)
    return Sampler(timesteps=jnp.asarray(ts, jnp.int32), abar=f(abar), abar_prev=f(abar_prev), sigma=f(sigma),
                   kind=kind, eta=1.0 if kind == "ddpm" else float(eta), clip_x0=clip_x0)


def image_noise(keys: jax.Array, i: jax.Array | int, image_shape: tuple[int, ...]) -> jax.Array:
    """Standard normal noise (B, *image_shape) for stream ``i`` of each image key.

    Stream 0 is the initial x_T; stream i + 1 is the fresh noise of sampler step i. Noise is drawn per
    image from its own key, so a trajectory does not depend on how images are batched, and the FP and
    quantized runs of one image see the same noise."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), tuple(image_shape), jnp.float32))(keys)


def sampler_step(sampler: Sampler, x_t: jax.Array, eps: jax.Array, i: jax.Array, keys: jax.Array) -> jax.Array:
    """One reverse step x_t -> x_{t_prev} given the model's eps at step index i (traced ok).

    keys: (B,) per-image keys (see :func:`image_noise`).
    x0_hat = (x_t - sqrt(1-abar) eps) / sqrt(abar) (clipped to [-1, 1] if clip_x0, eps then re-derived),
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    abar, abar_prev, sigma = sampler.abar[i], sampler.abar_prev[i], sampler.sigma[i]
    x0 = (x_t - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
    if sampler.clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
    z = image_noise(keys, i + 1, x_t.shape[1:])
    dir_coef = jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0))
    return jnp.sqrt(abar_prev) * x0 + dir_coef * eps + sigma * z


def sample(eps_at: Callable, sampler: Sampler, keys: jax.Array, image_shape: tuple[int, ...], *,
           return_trajectory: bool = False):
    """Run the reverse chain with ``lax.scan`` for a batch of per-image keys (B,).

    eps_at(x_t, t (B,), i) -> eps: the denoiser call (i, the step index, lets a quantized
    denoiser pick that step's bits). Returns x_0 (B, *image_shape) or (x_0, traj) with traj
    (S, B, *image_shape) holding x after each step (traj[-1] == x_0)."""
    x = image_noise(keys, 0, image_shape)

    def body(x, i):
        t = jnp.full((x.shape[0],), sampler.timesteps[i], jnp.int32)
        x = sampler_step(sampler, x, eps_at(x, t, i), i, keys)
        return x, (x if return_trajectory else None)

    x0, traj = jax.lax.scan(body, x, jnp.arange(sampler.num_steps))
    return (x0, traj) if return_trajectory else x0


def image_keys(seed: int, n: int, offset: int = 0) -> jax.Array:
    """Keys of images offset..offset+n-1 of the noise stream ``seed`` (a noise bank is such a range)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(offset, offset + n))
