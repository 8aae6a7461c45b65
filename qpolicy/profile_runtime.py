"""A profile-mode policy in onnxruntime: K quantized model variants built once, one picked per input and step by the
exported policy network.

``deploy_run(run_dir, out)`` (``qpolicy deploy onnx --run RUN``), for a run trained with ``env.action_space:
profiles``:

1. **Variants**: one QDQ ONNX model per profile (:func:`qpolicy.ort_runtime.quantize_segment` with the profile's
   bits rounded to what ORT expresses, :func:`~qpolicy.ort_runtime.ort_bits`), with static activation ranges over
   all steps (``range_buckets`` 1, so one model serves every step). K sessions are opened once.
2. **Policy**: the JAX-PPO actor as ONNX (:mod:`qpolicy.policy_export`), run with onnxruntime.
3. **Sampler**: per group of ``images_per_env`` images (the unit the policy decides for) and per step, the
   observation is computed from what the runtime knows (x_t, the step, the previous profile's bits, the running
   cost; the recipe of ``observation.json``, through the env's own ``get_obs``: no FP model or reference), the policy
   session picks profile k, and variant k's session computes eps.

Reported: the profile each group used at each step, how often each profile ran, the error of the final samples
against the JAX FP sampler (same noise) and against qpolicy's simulation of the chosen per-group schedules with the
rounded bits and the same ranges, timings, and the applied-bits check of each variant (``manifest.json``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .diffusion import image_keys, sampler_step
from .engine import make_engine, quant_config, relative_error
from .io import atomic_write_json
from .ort_runtime import DEPLOY_SEED, FP_BITS, _session, applied_bits, ort_bits, quantize_segment, tensor_overrides

MANIFEST_NAME = "manifest.json"


def _variant_engine(den: Any, env: Any, calib_n: int):
    """qpolicy's engine as ORT executes a variant: plain preset, static ranges over all steps (one bucket)."""
    choices = tuple(sorted(set(env.bit_choices) | {8, 16, FP_BITS}))
    qcfg = quant_config("plain", act_ranges="static", range_buckets=1, bit_choices=choices, calib_n=calib_n)
    return make_engine(den, steps=env.num_steps, sampler=env.sampler, eta=env.eta, qcfg=qcfg)


def deploy_run(run_dir: str | Path, out_dir: str | Path, *, n: int = 8, seed: int = DEPLOY_SEED, threads: int = 1,
               calib_n: int = 32, pick: Any = None) -> dict[str, Any]:
    """Run a profile-mode run's policy in onnxruntime on ``n`` images (rounded down to groups of images_per_env;
    noise stream ``seed``); see the module doc. Writes the variants, the policy ONNX and ``manifest.json`` into
    ``out_dir`` (locked while it writes). ``pick(obs (1, D), step) -> k``: replaces the policy network (tests, or a
    fixed plan); default the exported policy."""
    from .denoiser import load_denoiser
    from .envs import EnvConfig, EnvState
    from .envs.profiles import QuantDiffusionProfileCore
    from .onnx_export import cached_onnx
    from .policy_export import POLICY_ONNX, export_policy_onnx
    from .profiles import PROFILES_FILE, load_profiles
    from .rundir import check_fingerprint, locked
    from .runs import load_config, policy_fingerprint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(run_dir / "config.yaml")
    check_fingerprint(policy_fingerprint(run_dir, cfg), cfg.fingerprint(), what="the policy", where=run_dir)
    env = EnvConfig(**cfg.env)
    if env.action_space != "profiles" or cfg.agent != "ppo_jax":
        raise ValueError(f"deploy --run needs a JAX-PPO run trained with env.action_space 'profiles'; {run_dir} has "
                         f"agent {cfg.agent!r}, action_space {env.action_space!r} (deploy its schedule with "
                         "--schedule instead)")
    if not (run_dir / PROFILES_FILE).exists():
        raise FileNotFoundError(f"{run_dir} has no {PROFILES_FILE} (written by `qpolicy train` in profile mode)")
    den = load_denoiser(env.model)
    names_l = [l.path for l in den.layers]
    prof = load_profiles(run_dir / PROFILES_FILE, layer_names=names_l, layer_hash=den.layer_hash,
                         bit_choices=env.bit_choices)
    B = env.images_per_env
    G = n // B
    if G < 1:
        raise ValueError(f"n must be >= images_per_env={B} (the policy decides for groups of that many images), "
                         f"got {n}")
    t0 = time.perf_counter()
    eng = _variant_engine(den, env, calib_n)
    fp_path, names = cached_onnx(den, B)
    if names.unmapped:
        raise ValueError(f"layers {list(names.unmapped)} have no Conv/Gemm/MatMul node with their weight in the ONNX "
                         "model; onnxruntime cannot quantize them by name")
    S = env.num_steps
    ranges = np.asarray(eng.act_ranges_table)[0]
    fp_cal = np.asarray(jax.jit(eng.fp_trajectory)(image_keys(3000, B)))  # calibration stream inputs at every step
    timesteps = [int(t) for t in np.asarray(eng.sampler.timesteps)]
    feeds = [{"x": fp_cal[i], "t": np.full((B,), timesteps[i], np.int32)} for i in range(S)]
    rbw, rba, rounding = ort_bits(prof.bits_w, prof.bits_a, names_l)  # (K, L): "step" = profile index here
    paths, applied = [], []
    with locked(out_dir, what="deploy --out folder"):
        for k in range(prof.K):
            ov = tensor_overrides(names, rbw[k], rba[k], ranges, eng)
            p = quantize_segment(fp_path, names, ov, feeds, out_dir / f"profile_{k:02d}.onnx")
            got = applied_bits(p, names)
            want = {path: (int(rbw[k, l]), int(rba[k, l])) for l, path in enumerate(names_l)}
            applied.append({"profile": k, "layers_matching": sum(got[q] == want[q] for q in want), "layers": len(want)})
            paths.append(p)
        export_policy_onnx(run_dir / "policy", out_dir / "policy", batch=1)
    build_s = time.perf_counter() - t0
    sessions = [_session(p, threads) for p in paths]  # the K variants, opened once
    pol = _session(out_dir / "policy" / POLICY_ONNX, threads)

    # the observation recipe through the env's own get_obs, over the variant engine (no FP model, no reference):
    # profile bits enter as log2(bits)/5 whatever the choice set, the cost as the env's per-step profile cost
    core = QuantDiffusionProfileCore(env, eng, dataclasses.replace(prof, bit_choices=eng.qcfg.bit_choices))
    pw, pa = np.asarray(core._pw), np.asarray(core._pa)
    step_cost = np.asarray(prof.costs if prof.costs is not None else
                           [eng.cost_model().summary(prof.bits_w[k][None], prof.bits_a[k][None])["cost_rel_fp32"]
                            for k in range(prof.K)]) / S
    get_obs = jax.jit(core.get_obs)
    neg = jnp.full((core.L,), -1, jnp.int32)
    keys_all = image_keys(seed, G * B)
    step = jax.jit(lambda x, eps, i, keys: sampler_step(eng.sampler, x, eps, i, keys))
    choice = np.zeros((G, S), np.int64)
    x_final, spent = [], 0.0
    for g in range(G):
        keys = keys_all[g * B:(g + 1) * B]
        x, prev_w, prev_a, cost = eng.initial(keys), neg, neg, 0.0
        for i in range(S):
            st = EnvState(x=x, idx=jnp.zeros((B,), jnp.int32), i=jnp.asarray(i, jnp.int32), layer=jnp.asarray(0),
                          cur_w=neg, cur_a=neg, prev_w=prev_w, prev_a=prev_a, error=jnp.zeros(()),
                          error_sum=jnp.zeros(()), cost=jnp.asarray(cost, jnp.float32), bits_w_sum=jnp.zeros(()),
                          bits_a_sum=jnp.zeros(()), n_bits=jnp.asarray(0))
            obs = np.asarray(get_obs(st, None))[None]
            t1 = time.perf_counter()
            k = int(pol.run(["action"], {"obs": obs})[0].reshape(-1)[0]) if pick is None else int(pick(obs, i))
            eps = sessions[k].run(None, {"x": np.asarray(x), "t": np.full((B,), timesteps[i], np.int32)})[0]
            spent += time.perf_counter() - t1
            choice[g, i] = k
            prev_w, prev_a = jnp.asarray(pw[k]), jnp.asarray(pa[k])
            cost += float(step_cost[k])
            x = step(x, jnp.asarray(eps), i, keys)
        x_final.append(np.asarray(x))
    xq = np.concatenate(x_final)
    ref = np.asarray(jax.jit(eng.fp_trajectory)(keys_all))[-1]
    traj = jax.jit(eng.trajectory)
    sim = np.concatenate([np.asarray(traj(keys_all[g * B:(g + 1) * B], jnp.asarray(rbw[choice[g]], jnp.int32),
                                          jnp.asarray(rba[choice[g]], jnp.int32)))[-1] for g in range(G)])
    per_image = lambda a, b: np.asarray(relative_error(jnp.asarray(a), jnp.asarray(b)))  # noqa: E731
    counts = np.bincount(choice.ravel(), minlength=prof.K)
    res = {"run_dir": str(run_dir), "model_id": den.name, "n": G * B, "groups": G, "images_per_group": B,
           "seed": seed, "steps": S, "num_profiles": prof.K, "choices": choice.tolist(),
           "profile_counts": counts.tolist(), "mean_cost_rel_fp32": float(np.mean(step_cost[choice].sum(1))),
           "final_error": float(per_image(xq, ref).mean()), "final_error_vs_simulation":
           float(per_image(xq, sim).mean()), "final_error_simulation": float(per_image(sim, ref).mean()),
           "per_image": {"final_error": per_image(xq, ref).tolist()},
           "seconds_runtime": spent, "build_seconds": build_s, "threads": threads,
           "simulation": {"preset": "plain", "act_ranges": "static", "range_buckets": 1, "calib_n": calib_n},
           "variants": [{"profile": k, "file": p.name, "bits_w_executed": rbw[k].tolist(),
                         "bits_a_executed": rba[k].tolist(), **applied[k]} for k, p in enumerate(paths)],
           "rounding": rounding, "policy": {"file": f"policy/{POLICY_ONNX}", "observation": "policy/observation.json"}}
    atomic_write_json(out_dir / MANIFEST_NAME, {"format": "qpolicy-ort-profiles-manifest", **res,
                                                "how_to_use": "per group of images_per_group images and sampler step "
                                                "i: obs (observation.json) -> policy.onnx -> k; eps = "
                                                "profile_{k}.onnx(x, t)"})
    return res
