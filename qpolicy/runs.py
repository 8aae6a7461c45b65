"""Training runs: the run config, launching (SB3 agents via :mod:`qpolicy.agents.sb3`, JAX PPO), loading a trained
policy, and exporting its schedule. Evaluation against the baselines lives in :mod:`qpolicy.evaluation`.

A run directory holds ``config.yaml`` (the resolved :class:`RunConfig` and its ``fingerprint``), ``metrics.jsonl``,
``checkpoints/`` (periodic: SB3 zips, JAX PPO runner states), ``policy.zip`` (SB3) or ``policy/`` (JAX PPO: msgpack
+ json), ``.qpolicy.lock`` (the writer's lock, see :mod:`qpolicy.rundir`),
``wandb/`` (offline unless asked) and, after evaluation, ``eval/`` (evaluation.json, plots, schedules).
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from .config import check
from .io import atomic_write_json, atomic_write_text, read_json
from .profiles import check_run_profiles, record_run_profiles
from .rundir import check_fingerprint, check_writable_target, config_diff, fingerprint, locked
from .tracking import WANDB_MODES, Tracker

AGENTS = ("ppo", "a2c", "sac", "ppo_jax")
#: Written at the end of training: decisions, wall seconds, device (evaluation charges the run this compute).
TRAIN_SUMMARY = "train_summary.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One training run.

    name: run name (the default run directory is runs/<name>).
    agent: ppo | a2c (SB3, MultiDiscrete) | sac (SB3 on relaxed continuous bits, HAQ-style) | ppo_jax.
    env: keyword arguments of qpolicy.envs.EnvConfig (model, num_steps, lam, ...).
    layerwise: use QuantDiffusionLayerwise-v0 (one action per layer) instead of one action per step.
    total_timesteps: env decisions to train for.
    num_envs: parallel envs.
    seed: random seed of the agent and the env.
    agent_kwargs: passed to the SB3 constructor or to PPOConfig.
    checkpoint_every: decisions between checkpoints (SB3).
    eval_bank_size: eval-bank images for qpolicy evaluate.
    budget: baselines' cost budget (cost_rel_fp32: BOPs, or latency with env.cost latency); null = the learned policy's own cost (matched cost).
    wandb: offline | online | disabled.
    """

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
        put = lambda name, **rule: object.__setattr__(self, name, check(name, getattr(self, name), **rule))
        put("agent", kind="choice", choices=AGENTS)
        for f in ("total_timesteps", "num_envs", "checkpoint_every", "eval_bank_size"):
            put(f, kind="int", lo=1)
        put("seed", kind="int", lo=0)
        put("layerwise", kind="bool")
        put("wandb", kind="choice", choices=WANDB_MODES)
        put("name", kind="str")
        try:
            put("budget", kind="real", lo=0, lo_open=True, hi=1, optional=True)
        except ValueError:
            raise ValueError(f"budget must be a number in (0, 1] (a fraction of FP32 BOPs), got {self.budget!r}") \
                from None
        if self.agent == "sac" and self.layerwise:
            raise ValueError("agent 'sac' (relaxed continuous bits) needs layerwise: false; use ppo, a2c or ppo_jax "
                             "for the layer-wise env")
        for f in ("env", "agent_kwargs"):
            if not isinstance(getattr(self, f), dict):
                raise ValueError(f"{f} must be a mapping, got {type(getattr(self, f)).__name__}")
        if self.env.get("action_space") == "profiles" and (self.layerwise or self.agent == "sac"):
            raise ValueError("env.action_space 'profiles' (one profile index per step) needs the per-step env and a "
                             "discrete agent: set layerwise: false and agent ppo, a2c or ppo_jax"
                             + (f" (got agent {self.agent!r})" if self.agent == "sac" else " (got layerwise: true)"))
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

    def fingerprint(self) -> str:
        """Hash of the fields that shape the trained policy (the env fields resolved with their defaults);
        config.yaml, checkpoints and policies carry it, and a policy is never used under another config."""
        from qpolicy.envs import EnvConfig

        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_TRAINING}
        d["env"] = EnvConfig(**self.env).fingerprint_dict()
        # the device count does not shape the policy (same results up to float rounding; checkpoints resume on
        # any count), so a run may resume on another machine
        d["agent_kwargs"] = {k: v for k, v in d["agent_kwargs"].items() if k != "devices"}
        return fingerprint(d)


#: RunConfig fields that do not shape the trained policy (naming, logging, checkpoint cadence, evaluation)
_NOT_TRAINING = ("name", "checkpoint_every", "eval_bank_size", "budget", "wandb")
#: the key of config.yaml that records the config's fingerprint (not a RunConfig field)
FINGERPRINT_KEY = "fingerprint"


def validate(cfg: RunConfig) -> None:
    """Everything a run needs checked before anything is written: the agent's keywords (PPOConfig for ppo_jax,
    SB3's numeric keywords) and the env's model (found, readable)."""
    if cfg.agent == "ppo_jax":
        ppo = _ppo_config(cfg)
        if ppo.warm_start not in (None, "ilp") and not Path(ppo.warm_start).is_file():
            raise ValueError(f"agent_kwargs.warm_start: {ppo.warm_start!r} is neither 'ilp' nor a schedule file")
        if ppo.cost_target is not None and cfg.env.get("reward") == "budget":
            raise ValueError("agent_kwargs.cost_target (a Lagrangian target on the batch-mean cost) and env.reward "
                             "'budget' (a per-input cost penalty) both constrain the cost: use env.reward 'delta' or "
                             "'terminal' with cost_target, or 'budget' without it")
    else:
        from qpolicy.agents.sb3 import check_sb3_kwargs

        check_sb3_kwargs(cfg)
    from .config import check_memory
    from .denoiser import resolve_model_dir
    from qpolicy.envs import EnvConfig

    env = EnvConfig(**cfg.env)
    if env.action_space == "profiles" and cfg.agent == "ppo_jax" and _ppo_config(cfg).warm_start is not None:
        raise ValueError("agent_kwargs.warm_start clones a per-layer schedule into the actor; it has no meaning with "
                         "env.action_space 'profiles' (drop warm_start)")
    if not isinstance(env.model, (str, Path)):
        return  # a Denoiser object (Python API)
    mdir = resolve_model_dir(env.model)
    meta = read_json(mdir / "meta.json", what="checkpoint metadata")
    if env.cost == "latency" and isinstance(meta, dict):  # the table is found and matches before anything is written
        from .latency import default_path, load_table

        path = env.latency_table or default_path(mdir.resolve(), meta.get("name", mdir.name), meta.get("layer_hash"))
        load_table(path, layer_hash=meta.get("layer_hash"), num_layers=None, bit_choices=env.bit_choices)
    if env.action_space == "profiles" and env.profiles is not None:  # the file fits the model before any write
        from .profiles import load_profiles

        load_profiles(env.profiles, layer_hash=meta.get("layer_hash") if isinstance(meta, dict) else None,
                      bit_choices=env.bit_choices, tied=env.tie_weights_activations)
    shape = meta.get("image_shape") if isinstance(meta, dict) else None
    if isinstance(shape, list) and shape and all(isinstance(v, int) for v in shape):
        image = int(np.prod(shape)) * 4
        # the FP reference bank holds every state of every image; the envs hold their images' current states
        check_memory("env.bank_size", env.bank_size, image * (env.num_steps + 1), what="reference images")
        check_memory("num_envs x env.images_per_env", cfg.num_envs * env.images_per_env, image * 4,
                     what="env images")


def _ppo_config(cfg: RunConfig):
    from qpolicy.agents import ppo_jax

    try:
        return ppo_jax.PPOConfig(**{"num_envs": cfg.num_envs, "total_timesteps": cfg.total_timesteps,
                                    "seed": cfg.seed, **cfg.agent_kwargs})
    except TypeError as e:  # a value of the wrong type that PPOConfig's arithmetic meets first
        raise ValueError(f"agent_kwargs: {e}") from None


def _agent_kwargs(agent: str) -> set[str]:
    """Keyword arguments the agent's constructor accepts (PPOConfig fields for ppo_jax)."""
    if agent == "ppo_jax":
        from qpolicy.agents.ppo_jax import PPOConfig

        return {f.name for f in dataclasses.fields(PPOConfig)} - {"num_envs", "total_timesteps", "seed"}
    from qpolicy.agents.sb3 import sb3_kwargs

    return sb3_kwargs(agent)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")  # 1e-3, 3E+4: strings to YAML 1.1, floats here


def parse_value(text: str) -> Any:
    """One ``--set`` value: a YAML scalar (or flow list/mapping), except that exponent floats written without a
    dot (``1e-3``, which YAML 1.1 reads as a string) are floats."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--set value {text!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if isinstance(v, str) and _FLOAT.match(v.strip()):
        return float(v)
    return v


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {key}: {p!r} is not a mapping")
    d[parts[-1]] = value


def read_config_mapping(path: str | Path) -> dict:
    """The YAML mapping in a run-config file (FileNotFoundError / ValueError naming the file otherwise)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config {p} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config {p} must be a mapping of RunConfig fields")
    return d


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply ``key=value`` overrides (dotted keys, YAML values)."""
    d: dict = read_config_mapping(path) if path is not None else {}
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like key=value (e.g. env.lam=2.0)")
        k, v = o.split("=", 1)
        _set_dotted(d, k.strip(), parse_value(v))
    d.pop(FINGERPRINT_KEY, None)  # recorded by train; recomputed from the fields
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; accepted: {sorted(known)}")
    return RunConfig(**d)


# ------------------------------------------------------------------------------------------ training
def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train a policy into ``run_dir`` as a transaction: the whole config is validated before anything is written;
    the directory is locked for the run; a directory holding another config's run is refused; config.yaml records
    the fingerprint that checkpoints and the policy carry. Resumes from the latest checkpoint (every agent), with
    metrics.jsonl truncated to it. Returns a summary."""
    run_dir = Path(run_dir)
    validate(cfg)
    check_writable_target(run_dir, what="run directory")
    with locked(run_dir):
        _check_reuse(run_dir, cfg)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({**cfg.to_dict(), FINGERPRINT_KEY:
                                                                   cfg.fingerprint()}, sort_keys=False))
        t0 = time.time()
        record_run_profiles(cfg.env, run_dir, progress=progress)  # action_space 'profiles': what actions mean
        if cfg.agent == "ppo_jax":
            summary = _train_ppo_jax(cfg, run_dir, progress=progress, t0=t0)
        else:
            from qpolicy.agents.sb3 import train_sb3

            summary = train_sb3(cfg, run_dir, progress=progress, t0=t0)
        summary["device"] = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
        summary["fingerprint"] = cfg.fingerprint()
        atomic_write_json(run_dir / TRAIN_SUMMARY, summary)
    return summary


#: what a run directory holds from training (a directory holding any of them belongs to its config)
_RUN_ARTIFACTS = ("checkpoints", "policy", "policy.zip", TRAIN_SUMMARY)


def _check_reuse(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to train into a directory that holds checkpoints or a policy of another config."""
    f = run_dir / "config.yaml"
    if not f.exists() or not any((run_dir / a).exists() for a in _RUN_ARTIFACTS):
        return
    try:
        old = load_config(f)
    except ValueError as e:
        raise ValueError(f"run directory {run_dir} holds a run whose config.yaml is unreadable ({e}); use another "
                         "--run-dir or delete the directory") from None
    if old.fingerprint() != cfg.fingerprint():
        changed = config_diff(old.to_dict(), cfg.to_dict())
        raise ValueError(f"run directory {run_dir} holds a run of another config (changed: "
                         f"{', '.join(changed) or 'defaults'}); use another --run-dir, or delete the directory to "
                         "start over")


def _train_ppo_jax(cfg: RunConfig, run_dir: Path, *, progress: bool, t0: float) -> dict[str, Any]:
    from qpolicy.agents import ppo_jax
    from qpolicy.envs import make_core

    core = make_core(layerwise=cfg.layerwise, **cfg.env)
    pcfg = _ppo_config(cfg)
    ckpt = ppo_jax.Checkpointer(run_dir / "checkpoints", every=-(-cfg.checkpoint_every // pcfg.batch_size),
                                fingerprint=cfg.fingerprint())
    latest = ckpt.latest_update()
    resume_at = None if latest is None else latest * pcfg.batch_size
    tracker = Tracker(run_dir, config=cfg.to_dict(), mode=cfg.wandb, name=cfg.name, resume_at=resume_at)

    def log(m: dict, first: int) -> None:  # seed 0's rows (the run's policy), as each chunk finishes
        for u in range(np.shape(next(iter(m.values())))[1]):
            tracker.log({k: float(np.asarray(v)[0, u]) for k, v in m.items()}, (first + u + 1) * pcfg.batch_size)

    warm, init_params = _warm_start(cfg, pcfg, core, run_dir, resuming=latest is not None, progress=progress)
    try:
        res = ppo_jax.train(core, pcfg, progress=progress, checkpoint=ckpt, on_chunk=log, init_params=init_params)
    finally:
        tracker.close()
    params = res.seed_params(0)  # the first seed is the run's policy
    ppo_jax.save_policy(run_dir / "policy", params, pcfg, {**ppo_jax.core_meta(core), "layerwise": cfg.layerwise,
                                                           FINGERPRINT_KEY: cfg.fingerprint()})
    out = {"run_dir": str(run_dir), "agent": "ppo_jax", "timesteps": pcfg.num_updates * pcfg.num_envs * pcfg.num_steps,
           "wall_s": time.time() - t0, "env_steps_per_s": res.env_steps_per_s, "resumed": resume_at is not None}
    if warm is not None:
        out["warm_start"] = warm
    return out


#: the warm start's record in a run directory (kept for the summary of a resumed run)
WARM_START_FILE = "warm_start.json"


def _warm_start(cfg: RunConfig, pcfg: Any, core: Any, run_dir: Path, *, resuming: bool, progress: bool
                ) -> tuple[dict | None, Any]:
    """(record, starting params) of ``agent_kwargs.warm_start``: the static schedule (the ILP at cost_target, else
    env.budget; or a file) cloned into the actor. A resumed run starts from its checkpoint: only the record is
    read back."""
    if pcfg.warm_start is None:
        return None, None
    f = run_dir / WARM_START_FILE
    if resuming and f.exists():
        return read_json(f, what="warm start record"), None
    from qpolicy.agents.warm_start import clone_schedule, static_schedule
    from qpolicy.envs import EnvConfig

    budget = pcfg.cost_target if pcfg.cost_target is not None else EnvConfig(**cfg.env).budget
    src = static_schedule(pcfg.warm_start, core.engine, budget, progress=progress)
    params, fit = clone_schedule(core, core.default_params, src.bits_w, src.bits_a, pcfg, jax.random.key(pcfg.seed))
    cm = core.engine.cost_model().summary(src.bits_w, src.bits_a)
    rec = {"source": src.source, "budget": float(budget), "forwards": src.forwards, "seconds": src.seconds,
           "bops_rel_fp32": cm["bops_rel_fp32"], "bits_w": np.asarray(src.bits_w).tolist(),
           "bits_a": np.asarray(src.bits_a).tolist(), "cloning": fit}
    atomic_write_json(f, rec)
    return rec, params


# ------------------------------------------------------------------------------------------ loading and export
def load_run(run_dir: str | Path) -> tuple[RunConfig, Callable]:
    """(config, act) for a trained run; act(obs (N, D) numpy) -> actions (deterministic)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    check_fingerprint(policy_fingerprint(run_dir, cfg), cfg.fingerprint(), what="the policy", where=run_dir)
    check_run_profiles(run_dir, cfg.env)
    if cfg.agent == "ppo_jax":
        from qpolicy.agents import ppo_jax
        from qpolicy.envs import make_core

        params, pcfg, _ = ppo_jax.load_policy(run_dir / "policy")
        core = make_core(layerwise=cfg.layerwise, **cfg.env)
        pol = jax.jit(ppo_jax.policy_fn(pcfg, core), static_argnums=3)
        return cfg, lambda obs: np.asarray(pol(params, jnp.asarray(obs), jax.random.key(0), True))
    from qpolicy.agents.sb3 import load_sb3_policy

    return cfg, load_sb3_policy(run_dir, cfg.agent)


def policy_fingerprint(run_dir: Path, cfg: RunConfig) -> str | None:
    """The config fingerprint the run's trained policy carries (None for a policy written before fingerprints);
    FileNotFoundError when the run has no policy."""

    if cfg.agent == "ppo_jax":
        f = run_dir / "policy" / "policy.json"
        if not f.exists():
            raise FileNotFoundError(f"no trained policy in {run_dir} (expected policy/policy.json); run `qpolicy "
                                    "train` first")
        doc = read_json(f, what="policy metadata")
        meta = doc.get("meta", {}) if isinstance(doc, dict) else {}
        return meta.get(FINGERPRINT_KEY) if isinstance(meta, dict) else None
    from qpolicy.agents.sb3 import zip_fingerprint

    f = run_dir / "policy.zip"
    if not f.exists():
        raise FileNotFoundError(f"no trained policy in {run_dir} (expected policy.zip); run `qpolicy train` first")
    return zip_fingerprint(f)


def run_schedule_path(run_dir: str | Path) -> Path:
    """The run's exported schedule: ``learned_mean_schedule.json`` in the run folder (``qpolicy evaluate`` writes it
    there) or in its ``eval/`` subfolder (older layout)."""
    run_dir = Path(run_dir)
    for f in (run_dir / "learned_mean_schedule.json", run_dir / "eval" / "learned_mean_schedule.json"):
        if f.exists():
            return f
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    raise FileNotFoundError(f"{run_dir} holds no learned_mean_schedule.json (nor eval/learned_mean_schedule.json): "
                            f"the run was not evaluated; run `qpolicy evaluate --run {run_dir}` first")


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> list[Path]:
    """Export the run's schedule (the learned policy's mean schedule over the eval bank) in ``fmt``;
    the policy network itself stays in the run directory (policy.zip / policy.msgpack) and is copied
    next to a JSON export."""
    from qpolicy.schedule import BitSchedule

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    check_fingerprint(policy_fingerprint(run_dir, cfg), cfg.fingerprint(), what="the policy", where=run_dir)
    check_writable_target(out, what="export --out")
    sched = BitSchedule.load(run_schedule_path(run_dir))
    try:
        return _export_files(run_dir, cfg, sched, fmt, out)
    except OSError as e:  # a target the checks above could not foresee (/proc/x, a full disk): name the flag
        if e.filename is None or not _is_target(e.filename, out):
            raise
        raise OSError(f"export --out {out} cannot be written: {e.strerror or e} ({e.filename})") from e


def _is_target(path: str | Path, out: str | Path) -> bool:
    """``path`` is ``out``, inside it, one of its parents or a sibling (an atomic write's temp file)."""
    p, o = Path(path).absolute(), Path(out).absolute()
    return p == o or o in p.parents or p in o.parents or p.parent == o.parent


def _export_files(run_dir: Path, cfg: RunConfig, sched: Any, fmt: str, out: str | Path) -> list[Path]:
    from qpolicy.export import export

    if fmt == "policy_onnx":  # the network + observation recipe, the mean schedule, a v2 step policy naming both
        from qpolicy.policy_export import OBS_RECIPE, POLICY_ONNX, export_policy_onnx

        if not (run_dir / "policy" / "policy.json").exists():
            raise FileNotFoundError(f"{run_dir} has no JAX-PPO policy folder (policy/policy.json); format "
                                    "'policy_onnx' converts JAX-PPO policies only (SB3 policy.zip is not converted)")
        out = Path(out)
        with locked(out, what="export --out folder"):  # one writer at a time, as the other folder formats
            paths = export_policy_onnx(run_dir / "policy", out)
            paths.append(sched.save(out / "mean_schedule.json"))
            net = {"onnx": POLICY_ONNX, "observation": {"file": OBS_RECIPE}, "static_fallback": "mean_schedule.json"}
            return paths + export(sched, out / "config.json", "step_policy_v2", policy_network=net)
    paths = export(sched, out, fmt)
    if fmt == "json":  # the input-dependent policy's network travels next to its static fallback
        import shutil

        base = Path(paths[0])
        if cfg.agent == "ppo_jax":
            dst = base.with_name(base.stem + "_policy")
            shutil.copytree(run_dir / "policy", dst, dirs_exist_ok=True)
        else:
            dst = base.with_name(base.stem + "_policy.zip")
            shutil.copyfile(run_dir / "policy.zip", dst)
        paths.append(dst)
    return paths


