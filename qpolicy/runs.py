"""Training runs, evaluation against baselines, and export of learned precision policies.

A run directory holds ``config.yaml`` (the resolved :class:`RunConfig`), ``metrics.jsonl``,
``checkpoints/`` (periodic, SB3), ``policy.zip`` (SB3) or ``policy/`` (JAX PPO: msgpack + json),
``wandb/`` (offline unless asked) and, after evaluation, ``eval/`` (evaluation.json, plots, schedules).
"""
from __future__ import annotations

import dataclasses
import os

import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from .io import atomic_write_json, atomic_write_text
from .checks import is_int, is_real
from .tracking import WANDB_MODES, Tracker

AGENTS = ("ppo", "a2c", "sac", "ppo_jax")
BASELINE_SETS = ("all", "fast", "none")  # fast: every baseline but the per-(layer, step) search


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One training run.

    agent: ppo | a2c (SB3, MultiDiscrete) | sac (SB3 on relaxed continuous bits, HAQ-style) | ppo_jax.
    env: keyword arguments of :class:`qpolicy.envs.EnvConfig` (model, num_steps, lam, ...).
    layerwise: use ``QuantDiffusionLayerwise-v0`` (one action per layer) instead of one per step.
    total_timesteps: env decisions to train for; num_envs: parallel envs; agent_kwargs: passed to the
    SB3 constructor or to PPOConfig. checkpoint_every: decisions between checkpoints.
    eval_bank_size: eval-bank images for ``qpolicy evaluate``; budget: baselines' cost budget
    (bops_rel_fp32); None = the learned policy's own cost (matched cost)."""

    name: str = "run"
    agent: str = "ppo"
    env: dict = dataclasses.field(default_factory=dict)
    layerwise: bool = False
    total_timesteps: int = 20_000
    num_envs: int = 8
    seed: int = 0
    agent_kwargs: dict = dataclasses.field(default_factory=dict)
    checkpoint_every: int = 5_000
    eval_bank_size: int = 128
    budget: float | None = None
    wandb: str = "offline"

    def __post_init__(self) -> None:
        if self.agent not in AGENTS:
            raise ValueError(f"agent must be one of {AGENTS}, got {self.agent!r}")
        for f in ("total_timesteps", "num_envs", "checkpoint_every", "eval_bank_size"):
            if not is_int(getattr(self, f)) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be an integer >= 1, got {getattr(self, f)!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"layerwise must be true or false, got {self.layerwise!r}")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"wandb must be one of {WANDB_MODES}, got {self.wandb!r}")
        if self.budget is not None and not (is_real(self.budget) and 0 < self.budget <= 1):
            raise ValueError(f"budget must be a number in (0, 1] (a fraction of FP32 BOPs), got {self.budget!r}")
        if self.agent == "sac" and self.layerwise:
            raise ValueError("agent 'sac' (relaxed continuous bits) needs layerwise: false; use ppo, a2c or ppo_jax "
                             "for the layer-wise env")
        for f in ("env", "agent_kwargs"):
            if not isinstance(getattr(self, f), dict):
                raise ValueError(f"{f} must be a mapping, got {type(getattr(self, f)).__name__}")
        from qpolicy.envs import EnvConfig

        fields = {f.name for f in dataclasses.fields(EnvConfig)}
        unknown = sorted(set(self.env) - fields)
        if unknown:
            raise ValueError(f"unknown env fields {unknown}; accepted: {sorted(fields)}")
        EnvConfig(**self.env)  # validates values with errors naming the field
        accepted = _agent_kwargs(self.agent)
        unknown = sorted(set(self.agent_kwargs) - accepted)
        if unknown:
            raise ValueError(f"unknown agent_kwargs {unknown} for agent {self.agent!r}; accepted: {sorted(accepted)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _agent_kwargs(agent: str) -> set[str]:
    """Keyword arguments the agent's constructor accepts (PPOConfig fields for ppo_jax)."""
    import inspect

    if agent == "ppo_jax":
        from qpolicy.agents.ppo_jax import PPOConfig

        return {f.name for f in dataclasses.fields(PPOConfig)} - {"num_envs", "total_timesteps", "seed"}
    sig = inspect.signature(_sb3_class(agent).__init__)
    return set(sig.parameters) - {"self", "policy", "env", "seed", "device", "verbose"}


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {key}: {p!r} is not a mapping")
    d[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply ``key=value`` overrides (dotted keys, YAML values)."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config {p} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config {p} must be a mapping of RunConfig fields")
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like key=value (e.g. env.lam=2.0)")
        k, v = o.split("=", 1)
        _set_dotted(d, k.strip(), yaml.safe_load(v))
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; accepted: {sorted(known)}")
    return RunConfig(**d)


# ------------------------------------------------------------------------------------------ agents
def relaxed_to_index(actions: np.ndarray, nvec: np.ndarray) -> np.ndarray:
    """HAQ-style relaxation: a continuous action in [-1, 1] per entry -> the nearest choice index."""
    return np.rint((np.clip(actions, -1, 1) + 1) / 2 * (np.asarray(nvec) - 1)).astype(np.int64)


def _relaxed(venv):
    """Wrap an SB3 VecEnv with MultiDiscrete actions as a Box([-1, 1]^n) env (see relaxed_to_index)."""
    from gymnasium import spaces
    from stable_baselines3.common.vec_env import VecEnvWrapper

    nvec = np.asarray(venv.action_space.nvec)

    class RelaxedBits(VecEnvWrapper):
        def __init__(self, v):
            super().__init__(v, action_space=spaces.Box(-1.0, 1.0, (len(nvec),), np.float32))

        def reset(self):
            return self.venv.reset()

        def step_async(self, actions):
            self.venv.step_async(relaxed_to_index(actions, nvec))

        def step_wait(self):
            return self.venv.step_wait()

    return RelaxedBits(venv)


class _ProgressCallback:
    """SB3 callback: tqdm bar with return / error / cost, metrics.jsonl + wandb, periodic checkpoints."""

    def __new__(cls, *a, **k):
        from stable_baselines3.common.callbacks import BaseCallback

        class CB(BaseCallback):
            def __init__(self, tracker, bar, run_dir, every):
                super().__init__()
                self.tracker, self.bar, self.run_dir, self.every = tracker, bar, Path(run_dir), every
                self.ret = np.zeros(0)
                self.done_stats: list[tuple[float, float, float]] = []
                self.last_ckpt = 0

            def _on_training_start(self):
                self.ret = np.zeros(self.training_env.num_envs)
                self.last_ckpt = self.num_timesteps

            def _on_step(self):
                infos, rew, dones = self.locals["infos"], self.locals["rewards"], self.locals["dones"]
                self.ret += rew
                for i in np.flatnonzero(dones):
                    self.done_stats.append((self.ret[i], infos[i]["error"], infos[i]["cost"]))
                    self.ret[i] = 0
                self.bar.update(self.training_env.num_envs)
                if self.num_timesteps - self.last_ckpt >= self.every:
                    self.last_ckpt = self.num_timesteps
                    _save_sb3(self.model, self.run_dir / "checkpoints" / f"step_{self.num_timesteps:09d}.zip")
                return True

            def _on_rollout_end(self):
                if not self.done_stats:
                    return
                r, e, c = np.mean(self.done_stats, axis=0)
                self.done_stats = []
                self.bar.set_postfix(ret=f"{r:.3f}", err=f"{e:.3g}", cost=f"{c:.4f}")
                self.tracker.log({"episode_return": r, "final_error": e, "cost": c}, self.num_timesteps)

        return CB(*a, **k)


def _save_sb3(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)


def _sb3_class(agent: str):
    from stable_baselines3 import A2C, PPO, SAC

    return {"ppo": PPO, "a2c": A2C, "sac": SAC}[agent]


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train a policy; resumes from the latest checkpoint in ``run_dir`` (SB3 agents). Returns a summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t0 = time.time()
    if cfg.agent == "ppo_jax":
        return _train_ppo_jax(cfg, run_dir, progress=progress, t0=t0)
    from qpolicy.envs import make_sb3_vec_env

    venv = make_sb3_vec_env(cfg.num_envs, layerwise=cfg.layerwise, seed=cfg.seed, **cfg.env)
    if cfg.agent == "sac":
        venv = _relaxed(venv)
    algo = _sb3_class(cfg.agent)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.zip"))
    resume = bool(ckpts)
    if resume:
        model = algo.load(ckpts[-1], env=venv, device="cpu")
    else:
        kw = {"n_steps": 32, "batch_size": 64} if cfg.agent == "ppo" else {}
        kw = {**kw, **cfg.agent_kwargs}
        model = algo("MlpPolicy", venv, seed=cfg.seed, device="cpu", verbose=0, **kw)
    tracker = Tracker(run_dir, config=cfg.to_dict(), mode=cfg.wandb, name=cfg.name, resume=resume)
    bar = tqdm(total=cfg.total_timesteps, initial=model.num_timesteps, desc=f"train {cfg.agent}", unit="step",
               disable=not progress)
    try:
        cb = _ProgressCallback(tracker, bar, run_dir, cfg.checkpoint_every)
        remaining = max(cfg.total_timesteps - model.num_timesteps, 0)
        if remaining:
            model.learn(remaining, callback=cb, reset_num_timesteps=not resume, progress_bar=False)
            _save_sb3(model, run_dir / "checkpoints" / f"step_{model.num_timesteps:09d}.zip")
        _save_sb3(model, run_dir / "policy.zip")
    finally:
        bar.close()
        tracker.close()
        venv.close()
    return {"run_dir": str(run_dir), "agent": cfg.agent, "timesteps": int(model.num_timesteps),
            "wall_s": time.time() - t0, "resumed": resume}


def _train_ppo_jax(cfg: RunConfig, run_dir: Path, *, progress: bool, t0: float) -> dict[str, Any]:
    from qpolicy.agents import ppo_jax
    from qpolicy.envs import make_core

    core = make_core(layerwise=cfg.layerwise, **cfg.env)
    pcfg = ppo_jax.PPOConfig(**{"num_envs": cfg.num_envs, "total_timesteps": cfg.total_timesteps, "seed": cfg.seed,
                                **cfg.agent_kwargs})
    res = ppo_jax.train(core, pcfg, progress=progress)
    params = res.seed_params(0)  # the first seed is the run's policy
    ppo_jax.save_policy(run_dir / "policy", params, pcfg, {**ppo_jax.core_meta(core), "layerwise": cfg.layerwise})
    tracker = Tracker(run_dir, config=cfg.to_dict(), mode=cfg.wandb, name=cfg.name)
    for u in range(res.metrics[next(iter(res.metrics))].shape[1]):
        tracker.log({k: float(np.asarray(v)[0, u]) for k, v in res.metrics.items()}, (u + 1) * pcfg.num_envs
                    * pcfg.num_steps)
    tracker.close()
    return {"run_dir": str(run_dir), "agent": "ppo_jax",
            "timesteps": pcfg.num_updates * pcfg.num_envs * pcfg.num_steps,
            "wall_s": time.time() - t0, "env_steps_per_s": res.env_steps_per_s, "resumed": False}


# ------------------------------------------------------------------------------------------ evaluation
def load_run(run_dir: str | Path) -> tuple[RunConfig, Callable]:
    """(config, act) for a trained run; act(obs (N, D) numpy) -> actions (deterministic)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.agent == "ppo_jax":
        from qpolicy.agents import ppo_jax
        from qpolicy.envs import make_core

        params, pcfg, _ = ppo_jax.load_policy(run_dir / "policy")
        core = make_core(layerwise=cfg.layerwise, **cfg.env)
        pol = jax.jit(ppo_jax.policy_fn(pcfg, core), static_argnums=3)
        return cfg, lambda obs: np.asarray(pol(params, jnp.asarray(obs), jax.random.key(0), True))
    f = run_dir / "policy.zip"
    if not f.exists():
        raise FileNotFoundError(f"no trained policy in {run_dir} (expected policy.zip); run `qpolicy train` first")
    model = _sb3_class(cfg.agent).load(f, device="cpu")
    return cfg, lambda obs: model.predict(obs, deterministic=True)[0]


def policy_schedules(cfg: RunConfig, act: Callable, core, params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Roll the deterministic policy over the bank in fixed groups of ``images_per_env`` images.

    Returns (idx (G, B) bank indices, bits_w (G, S, L), bits_a (G, S, L)): the input-dependent schedule
    the policy chose for each group."""
    B, N = core.B, int(params.bank_keys.shape[0])
    G = N // B
    idx = jnp.arange(G * B, dtype=jnp.int32).reshape(G, B)
    _, states = core.jit_reset_batch(jax.random.key(0), params, G)
    states = states.replace(idx=idx, x=params.bank_traj[0, idx])
    get_obs = jax.jit(jax.vmap(core.get_obs, in_axes=(0, None)))
    step = jax.jit(jax.vmap(core.step_env, in_axes=(None, 0, 0, None)))
    obs = get_obs(states, params)
    S, L = core.engine.num_steps, core.L
    iw = np.zeros((G, S, L), np.int64)
    ia = np.zeros((G, S, L), np.int64)
    nvec = np.asarray(core.action_nvec())
    for d in range(core.episode_length):
        a = np.asarray(act(np.asarray(obs)))
        if cfg.agent == "sac":
            a = relaxed_to_index(a, nvec)
        a = a.reshape(G, -1)
        if cfg.layerwise:
            i, l = divmod(d, L)
            iw[:, i, l] = a[:, 0]
            ia[:, i, l] = a[:, -1]
        else:
            iw[:, d], ia[:, d] = a[:, :L], a[:, -L:]
        obs, states, *_ = step(jax.random.key(0), states, jnp.asarray(a), params)
    choices = np.asarray(core.engine.qcfg.bit_choices)
    return np.asarray(idx), choices[iw], choices[ia]


def _snap(bits: np.ndarray, choices: tuple[int, ...]) -> np.ndarray:
    """Nearest choice in log2 space (a geometric mean of bits maps back onto the choice set)."""
    c = np.asarray(choices)
    return c[np.abs(np.log2(bits)[..., None] - np.log2(c)).argmin(-1)]


def evaluate_run(run_dir: str | Path, *, baselines: str = "all", budget: float | None = None,
                 n: int | None = None, progress: bool = True, with_fd: bool = True) -> dict[str, Any]:
    """Evaluate the learned policy and the baselines on the held-out eval bank; write plots and schedules.

    Every policy runs on the same eval-bank images (in groups of images_per_env for the learned one;
    per-image dynamic activation ranges make that grouping irrelevant to the errors)."""
    from qpolicy.envs import make_core
    from qpolicy.rollout import reference_bank

    if baselines not in BASELINE_SETS:
        raise ValueError(f"baselines must be one of {BASELINE_SETS}, got {baselines!r}")
    run_dir = Path(run_dir)
    cfg, act = load_run(run_dir)
    from qpolicy.envs import EnvConfig

    B = EnvConfig(**cfg.env).images_per_env
    n = n or cfg.eval_bank_size
    if not is_int(n) or n < B:
        raise ValueError(f"n (eval-bank images, --n / eval_bank_size) must be an integer >= images_per_env={B}, "
                         f"got {n!r}")
    n = n // B * B  # the learned policy runs in groups of images_per_env; every policy sees the same images
    env_kw = {**cfg.env, "bank": "eval", "bank_size": n}
    core = make_core(layerwise=cfg.layerwise, **env_kw)
    params = core.default_params
    eng = core.engine
    bank = reference_bank(eng, "eval", n)
    cm = eng.cost_model()
    out_dir = run_dir / "eval"
    idx, bw_g, ba_g = policy_schedules(cfg, act, core, params)
    # errors of the input-dependent schedules, one group at a time (bits are traced: no recompiles)
    errs, samples = [], []
    for g in range(idx.shape[0]):
        e, x = eng.errors_fn(bank.keys[idx[g]], bank.traj[:, idx[g]], jnp.asarray(bw_g[g], jnp.int32),
                             jnp.asarray(ba_g[g], jnp.int32))
        errs.append(np.asarray(e))
        samples.append(np.asarray(x))
    e = np.concatenate(errs, axis=1)
    sums = [cm.summary(bw_g[g], ba_g[g]) for g in range(idx.shape[0])]
    learned = {k: float(np.mean([s[k] for s in sums])) for k in sums[0]}
    learned.update(name=f"learned_{cfg.agent}", kind="learned", traj_error=float(e.mean()),
                   final_error=float(e[-1].mean()), per_step_error=e.mean(1).tolist(), n=int(e.shape[1]),
                   input_dependent=True)
    learned_samples = np.concatenate(samples)
    mean_w = _snap(np.exp2(np.log2(bw_g).mean(0)), eng.qcfg.bit_choices)
    mean_a = _snap(np.exp2(np.log2(ba_g).mean(0)), eng.qcfg.bit_choices)
    from qpolicy.rollout import evaluate_schedule

    records: list[tuple[dict, np.ndarray, np.ndarray, np.ndarray | None]] = [(learned, mean_w, mean_a, learned_samples)]
    mr = evaluate_schedule(eng, bank, mean_w, mean_a)
    records.append(({**{k: v for k, v in mr.items() if k != "samples"}, "name": f"learned_{cfg.agent}_mean_schedule",
                     "kind": "learned"}, mean_w, mean_a, mr["samples"]))
    budget = budget if budget is not None else (cfg.budget if cfg.budget is not None else learned["bops_rel_fp32"])
    if baselines != "none":
        from qpolicy.agents.baselines import all_baselines

        train_bank = reference_bank(eng, "train", 32)
        bls = all_baselines(eng, train_bank, budget, search=baselines == "all", progress=progress)
        for b in tqdm(bls, desc="evaluate baselines", disable=not progress):
            r = evaluate_schedule(eng, bank, b.bits_w, b.bits_a)
            records.append(({**{k: v for k, v in r.items() if k != "samples"}, "name": b.name, "kind": "baseline"},
                            b.bits_w, b.bits_a, r["samples"]))
    if with_fd and eng.den.dataset:
        from qpolicy.metrics import _real_reference, load_feature_extractor, sample_quality

        ext = load_feature_extractor(eng.den.dataset)
        real, m = _real_reference(eng.den.dataset, n)
        rf = (ext.features(real[:m]), ext.features(real[m:]))
        for rec, *_, smp in tqdm(records, desc="fd", disable=not progress):
            rec["fd"] = sample_quality(smp, eng.den.dataset, extractor=ext, real_features=rf)["fd"]
        fd_fp = sample_quality(np.asarray(bank.traj[-1]), eng.den.dataset, extractor=ext, real_features=rf)
    result = {"run": str(run_dir), "model": eng.den.name, "steps": eng.num_steps, "eval_n": n, "budget": budget,
              "fd_fp": fd_fp["fd"] if with_fd and eng.den.dataset else None,
              "fd_real_split": fd_fp["fd_real_split"] if with_fd and eng.den.dataset else None,
              "policies": [r for r, *_ in records]}
    matched = [r for r, *_ in records if r["kind"] == "baseline" and r["bops_rel_fp32"] <= learned["bops_rel_fp32"] + 1e-9]
    if matched:
        best = min(matched, key=lambda r: r["final_error"])
        result["best_baseline_at_matched_cost"] = {"name": best["name"], "final_error": best["final_error"],
                                                   "bops_rel_fp32": best["bops_rel_fp32"]}
        result["learned_beats_best_baseline"] = learned["final_error"] < best["final_error"]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "evaluation.json", result)
    from qpolicy import plots
    from qpolicy.schedule import BitSchedule

    import io as _io

    buf = _io.BytesIO()  # every schedule's bits, for re-plotting or re-use: name -> (S, L) arrays
    np.savez(buf, **{f"{r['name']}__{which}": b for r, w, a, _ in records for which, b in (("w", w), ("a", a))})
    from .io import atomic_write_bytes

    atomic_write_bytes(out_dir / "schedules.npz", buf.getvalue())
    plots.pareto(result["policies"], out_dir / "pareto.png", title=f"{eng.den.name}: cost vs final error")
    plots.bit_heatmaps([(r["name"], w, a) for r, w, a, _ in records], [l.path for l in eng.den.layers],
                       out_dir / "bits_heatmaps.png")
    plots.fp_vs_quantized(np.asarray(bank.traj[-1][:32]), learned_samples[:32], out_dir / "samples_fp_vs_learned.png")
    sched = BitSchedule.for_denoiser(eng.den, eng.sampler, mean_w, mean_a,
                                     quantizer=_quantizer_dict(eng),
                                     summary={k: v for k, v in records[1][0].items() if isinstance(v, (int, float))},
                                     provenance={"policy": f"learned_{cfg.agent}", "kind": "mean schedule of an "
                                                 "input-dependent policy over the eval bank (static fallback)",
                                                 "run": str(run_dir), "seed": cfg.seed, "config": cfg.to_dict()},
                                     bit_choices=eng.qcfg.bit_choices)
    sched.save(out_dir / "learned_mean_schedule.json")
    result["files"] = {"evaluation": str(out_dir / "evaluation.json"), "pareto": str(out_dir / "pareto.png"),
                       "heatmaps": str(out_dir / "bits_heatmaps.png"),
                       "samples": str(out_dir / "samples_fp_vs_learned.png"),
                       "schedule": str(out_dir / "learned_mean_schedule.json")}
    atomic_write_json(out_dir / "evaluation.json", result)
    return result


def _quantizer_dict(eng) -> dict:
    from qpolicy.schedule import quantizer_dict

    return quantizer_dict(eng.qcfg.w_spec, eng.qcfg.a_spec, eng.qcfg.act_ranges)


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> list[Path]:
    """Export the run's schedule (the learned policy's mean schedule over the eval bank) in ``fmt``;
    the policy network itself stays in the run directory (policy.zip / policy.msgpack) and is copied
    next to a JSON export."""
    from qpolicy.export import export
    from qpolicy.schedule import BitSchedule

    run_dir = Path(run_dir)
    f = run_dir / "eval" / "learned_mean_schedule.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: run `qpolicy evaluate --run {run_dir}` first")
    sched = BitSchedule.load(f)
    paths = export(sched, out, fmt)
    if fmt == "json":  # the input-dependent policy's network travels next to its static fallback
        import shutil

        base = Path(paths[0])
        if (run_dir / "policy.zip").exists():
            dst = base.with_name(base.stem + "_policy.zip")
            shutil.copyfile(run_dir / "policy.zip", dst)
            paths.append(dst)
        if (run_dir / "policy").is_dir():
            dst = base.with_name(base.stem + "_policy")
            shutil.copytree(run_dir / "policy", dst, dirs_exist_ok=True)
            paths.append(dst)
    return paths


