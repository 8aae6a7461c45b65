"""Denoiser training: optax AdamW with warm-up, EMA weights, progress bar, wandb, checkpoints, resume."""
from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .data import load_dataset
from .denoiser import save_checkpoint
from .diffusion import SCHEDULES, eps_loss, make_schedule
from .conditioning import DEFAULT_GUIDANCE_SCALES, Conditioning, check_labels
from .io import atomic_write_bytes, load_pytree
from .models import PRESETS, UNet, preset_config
from .config import check
from .tracking import WANDB_MODES, Tracker


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Denoiser training run (``qpolicy denoiser train``; every field is a flag).

    data: dataset: digits | faces | patches | npz:PATH | cifar10:DIR.
    preset: U-Net size preset (tiny, small, medium).
    steps: optimizer steps.
    out: checkpoint folder (resumes if it holds a training state).
    batch_size: images per optimizer step.
    lr: AdamW peak learning rate.
    warmup: linear learning-rate warm-up steps.
    weight_decay: AdamW weight decay.
    grad_clip: global-norm gradient clip.
    ema_decay: decay of the EMA weights (the ones saved for sampling).
    schedule: noise schedule: linear | cosine.
    num_timesteps: diffusion timesteps of the schedule.
    dropout: ResBlock dropout (none = the preset's).
    seed: random seed.
    ckpt_every: optimizer steps between checkpoints.
    log_every: optimizer steps between metric rows.
    wandb: offline | online | disabled.
    weights_dtype: stored weights: float32 | float16.
    name: model name recorded in the checkpoint (default: the folder name).
    time_limit_s: stop early (and save) once this much wall time has passed.
    init_from: checkpoint folder whose weights start params and EMA (fine-tune; fresh optimizer).
    conditional: train a class-conditional model on the dataset's labels (classifier-free guidance; every image
        needs a label); the checkpoint records its requests (qpolicy.conditioning).
    label_dropout: with conditional, the fraction of training images whose label is replaced by the null label (the
        unconditional branch guidance needs).
    guidance_scales: with conditional, the guidance scales a sampling request draws from (recorded in the
        checkpoint).
    """

    data: str
    preset: str
    steps: int
    out: str
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    schedule: str = "linear"
    num_timesteps: int = 1000
    dropout: float | None = None
    seed: int = 0
    ckpt_every: int = 5000
    log_every: int = 100
    wandb: str = "offline"
    weights_dtype: str = "float32"
    name: str | None = None
    time_limit_s: float | None = None
    init_from: str | None = None
    conditional: bool = False
    label_dropout: float = 0.1
    guidance_scales: tuple[float, ...] = DEFAULT_GUIDANCE_SCALES

    def __post_init__(self) -> None:
        put = lambda name, **rule: object.__setattr__(self, name, check(name, getattr(self, name), **rule))
        put("preset", kind="choice", choices=tuple(sorted(PRESETS)))
        for f in ("steps", "batch_size", "ckpt_every", "log_every", "num_timesteps"):
            put(f, kind="int", lo=1)
        put("warmup", kind="int", lo=0)
        put("seed", kind="int", lo=0)
        put("schedule", kind="choice", choices=SCHEDULES)
        put("ema_decay", kind="real", lo=0, hi=1, hi_open=True)
        for f in ("lr", "grad_clip"):  # lr <= 0 would ascend or freeze; clip <= 0 zeroes every update
            put(f, kind="real", lo=0, lo_open=True)
        put("weight_decay", kind="real", lo=0)
        put("dropout", kind="real", lo=0, hi=1, hi_open=True, optional=True)
        put("time_limit_s", kind="real", lo=0, lo_open=True, optional=True)
        put("wandb", kind="choice", choices=WANDB_MODES)
        put("weights_dtype", kind="choice", choices=("float32", "float16"))
        put("data", kind="str")
        put("out", kind="str")
        put("conditional", kind="bool")
        put("label_dropout", kind="real", lo=0, hi=1, hi_open=True)
        if self.conditional:  # validates the scales (a clear error naming the field)
            Conditioning(num_classes=2, guidance_scales=self.guidance_scales)

    def fingerprint(self) -> str:
        """Hash of the fields that shape the training trajectory (a resume must match it; steps, out, logging and
        checkpoint cadence may change)."""
        from .rundir import fingerprint

        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _FREE_ON_RESUME}
        for k in _LATER_FIELDS:  # added later: at their defaults they leave older fingerprints as they were
            if d[k] == getattr(TrainConfig, k):
                del d[k]
        return fingerprint(d)


#: TrainConfig fields a resumed training may change
_FREE_ON_RESUME = ("steps", "out", "wandb", "ckpt_every", "log_every", "time_limit_s", "name", "weights_dtype")
#: fields added after the fingerprint's first version
_LATER_FIELDS = ("conditional", "label_dropout", "guidance_scales")


def _check_resume(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a training state written under another config (its checkpoint records the fingerprint)."""
    from .io import read_json
    from .rundir import config_diff

    meta = read_json(out / "meta.json", what="checkpoint metadata") if (out / "meta.json").exists() else {}
    train = meta.get("train", {}) if isinstance(meta, dict) else {}
    found = train.get("fingerprint") if isinstance(train, dict) else None
    if found is not None and found != cfg.fingerprint():
        old = {k: train[k] for k in ("preset", "batch_size", "lr", "ema_decay", "seed") if k in train}
        changed = config_diff(old, {k: getattr(cfg, k) for k in old})
        raise ValueError(f"out={str(out)!r} holds a training run of another config (fingerprint {found}, this "
                         f"config {cfg.fingerprint()}{'; changed: ' + ', '.join(changed) if changed else ''}); "
                         "resume with the same config or use another --out folder")


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    lr = optax.warmup_constant_schedule(0.0, cfg.lr, max(cfg.warmup, 1))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(lr, weight_decay=cfg.weight_decay))


def train_denoiser(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume, if ``out/train_state.msgpack`` exists) and write checkpoints into ``cfg.out``.

    Returns a summary dict: steps, first/last logged loss, wall seconds. ``cfg.out`` is locked for the run (a second
    writer is refused); a training state of another config (preset, data, lr, ...) is refused, not resumed."""
    from .rundir import check_writable_target, locked

    check_writable_target(cfg.out, what="out")
    with locked(cfg.out, what="denoiser folder"):
        if (Path(cfg.out) / "train_state.msgpack").exists():
            _check_resume(Path(cfg.out), cfg)  # before any work
        return _train_denoiser(cfg, progress=progress)


def _train_denoiser(cfg: TrainConfig, *, progress: bool) -> dict[str, Any]:
    ds = load_dataset(cfg.data, "train")
    h, w, c = ds.image_shape
    overrides = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    cond = None
    if cfg.conditional:
        if ds.num_classes < 2:
            raise ValueError(f"conditional=True needs a labelled dataset with >= 2 classes; {cfg.data!r} has "
                             f"{ds.num_classes}")
        check_labels(ds.labels, ds.num_classes, cfg.data)
        cond = Conditioning(num_classes=ds.num_classes, guidance_scales=cfg.guidance_scales,
                            label_names=tuple(ds.class_names) if getattr(ds, "class_names", None) else None)
        overrides["num_classes"] = ds.num_classes
    mcfg = preset_config(cfg.preset, image_size=h, in_channels=c, **overrides)
    if h != w:
        raise ValueError(f"dataset {cfg.data!r} has non-square images {ds.image_shape}; the U-Net needs H == W")
    model = UNet(mcfg)
    schedule = make_schedule(cfg.schedule, cfg.num_timesteps)
    key = jax.random.key(cfg.seed)
    key, init_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32))["params"]
    prior_steps = 0
    if cfg.init_from:
        from .denoiser import load_denoiser

        src = load_denoiser(cfg.init_from)
        src_params = dict(src.params)
        if cond is not None and src.conditioning is None and "label" in params and "label" not in src_params:
            # an unconditional checkpoint starts a conditional model: the label embedding starts at zero, so the
            # model starts as the unconditional one for every label and learns the conditioning
            src_params["label"] = jax.tree_util.tree_map(jnp.zeros_like, params["label"])
        if jax.tree_util.tree_structure(src_params) != jax.tree_util.tree_structure(dict(params)):
            raise ValueError(f"init_from={cfg.init_from!r} has a different architecture than preset {cfg.preset!r}")
        params = src_params
        prior_steps = int(src.metadata.get("train", {}).get("steps", 0))
    tx = _optimizer(cfg)
    state = {"params": params, "ema": params, "opt": tx.init(params), "step": 0, "key": jax.random.key_data(key)}
    out = Path(cfg.out)
    resume_file = out / "train_state.msgpack"
    if resume_file.exists():
        restored = load_pytree(resume_file, what="training state")
        try:
            state = flax.serialization.from_state_dict(state, restored)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"out={str(out)!r} holds the training state of another model (not preset "
                             f"{cfg.preset!r} on {cfg.data!r}): use another --out folder ({str(e)[:80]})") from None
    start = int(state["step"])
    if start >= cfg.steps:  # already trained this far: keep the checkpoint and its record as they are
        return {"steps": start, "first_loss": None, "last_loss": None, "wall_s": 0.0, "out": str(out),
                "already_complete": True}
    data = jnp.asarray(ds.images)
    labels = jnp.asarray(np.maximum(ds.labels, 0), jnp.int32)

    def loss_fn(p, x, y, k):
        kd, kl = jax.random.split(k)  # (the unconditional stream is the one it always was)
        if cond is not None:  # label dropout: the unconditional branch of classifier-free guidance
            ky = jax.random.fold_in(k, 1)
            y = jnp.where(jax.random.uniform(ky, y.shape) < cfg.label_dropout, cond.null_label, y)
        yk = {"y": y} if cond is not None else {}
        eps_fn = lambda xt, t: model.apply({"params": p}, xt, t, train=True, rngs={"dropout": kd}, **yk)
        return eps_loss(eps_fn, schedule, x, kl)

    def one_step(carry, _):
        p, ema, opt, k = carry
        k, kb, kl = jax.random.split(k, 3)
        pick = jax.random.randint(kb, (cfg.batch_size,), 0, data.shape[0])
        loss, g = jax.value_and_grad(loss_fn)(p, data[pick], labels[pick], kl)
        upd, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, upd)
        ema = jax.tree_util.tree_map(lambda e, q: cfg.ema_decay * e + (1 - cfg.ema_decay) * q, ema, p)
        return (p, ema, opt, k), loss

    chunk_len = min(cfg.log_every, cfg.steps)  # steps run in jitted chunks of (at most) this many

    @jax.jit
    def chunk(p, ema, opt, k, n):
        # n (traced) steps in one compiled loop, so a shorter last chunk (steps not a multiple of
        # log_every, or a resumed run) stops exactly at cfg.steps without a recompile.
        def body(_, c):
            carry, total = c
            carry, loss = one_step(carry, None)
            return carry, total + loss

        (p, ema, opt, k), total = jax.lax.fori_loop(0, n, body, ((p, ema, opt, k), jnp.zeros((), jnp.float32)))
        return p, ema, opt, k, total / n

    tracker = Tracker(out, config=dataclasses.asdict(cfg), mode=cfg.wandb, name=cfg.name or out.name,
                      resume_at=start if start > 0 else None)
    p, ema, opt = state["params"], state["ema"], state["opt"]
    k = jax.random.wrap_key_data(jnp.asarray(state["key"]))
    first_loss = last_loss = float("nan")
    t0 = time.time()
    step = start
    bar = tqdm(total=cfg.steps, initial=start, desc="train denoiser", disable=not progress, unit="step")

    def save(final: bool):
        st = {"params": p, "ema": ema, "opt": opt, "step": step, "key": jax.random.key_data(k)}
        atomic_write_bytes(resume_file, flax.serialization.msgpack_serialize(
            jax.tree_util.tree_map(np.asarray, flax.serialization.to_state_dict(st))))
        train_info = {"steps": step, "init_from": cfg.init_from, "prior_steps": prior_steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "ema_decay": cfg.ema_decay,
                      "preset": cfg.preset, "seed": cfg.seed, "wall_s": round(time.time() - t0, 1),
                      "machine": f"{platform.node()} {jax.devices()[0].device_kind}", "final_loss": last_loss,
                      "complete": final and step >= cfg.steps, "fingerprint": cfg.fingerprint()}
        if cond is not None:
            train_info.update(conditional=True, label_dropout=cfg.label_dropout)
        save_checkpoint(out, module=model, params=ema, schedule=schedule, dataset=cfg.data,
                        image_shape=ds.image_shape, train=train_info, name=cfg.name or out.name,
                        weights_dtype=cfg.weights_dtype,
                        extra={"conditioning": cond.to_dict()} if cond is not None else None)

    try:
        while step < cfg.steps:
            n = min(chunk_len, cfg.steps - step)
            p, ema, opt, k, loss = chunk(p, ema, opt, k, jnp.int32(n))
            prev, step = step, step + n
            last_loss = float(loss)
            if first_loss != first_loss:
                first_loss = last_loss
            tracker.log({"loss": last_loss}, step)
            bar.update(n)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if cfg.time_limit_s is not None and time.time() - t0 > cfg.time_limit_s:
                bar.write(f"time limit {cfg.time_limit_s:.0f}s reached at step {step}; saving")
                break
            if step // cfg.ckpt_every > prev // cfg.ckpt_every and step < cfg.steps:
                save(final=False)
        save(final=True)
    finally:
        bar.close()
        tracker.close()
    return {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "wall_s": time.time() - t0,
            "out": str(out)}
