"""What a JAX-PPO run writes: periodic checkpoints of the whole training state (:class:`Checkpointer`, for a
bit-exact resume) and the policy folder (:func:`save_policy` / :func:`load_policy`: params + config + env
metadata)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.config import is_int
from qpolicy.io import atomic_write_json, load_pytree, read_json, save_pytree

from .ppo_config import PPOConfig
from .ppo_networks import ActorCritic, _action_spec

POLICY_FORMAT = "qpolicy.ppo_jax"
POLICY_VERSION = 1
WEIGHTS_FILE = "policy.msgpack"
META_FILE = "policy.json"


class Checkpointer:
    """Periodic checkpoints of a PPO run (all seeds' params, optimizer states, env states, observations, episode
    returns, RNG and the update index) in ``folder``: ``ppo_<update>.msgpack`` + ``ppo_<update>.json`` (update,
    fingerprint), each written atomically, JSON last; only the latest is kept. Resuming from one continues the
    run bit-exactly (same chunks, same compiled update).

    every: updates between checkpoints (rounded up to whole chunks); fingerprint: the run config's, checked on
    restore."""

    def __init__(self, folder: str | Path, every: int, fingerprint: str | None = None):
        self.folder, self.every, self.fingerprint = Path(folder), max(int(every), 1), fingerprint
        self.last = 0

    def latest(self) -> Path | None:
        found = sorted(self.folder.glob("ppo_*.json"))
        return found[-1] if found else None

    def _meta(self, meta_file: Path) -> dict:
        meta = read_json(meta_file, what="PPO checkpoint metadata")
        if not isinstance(meta, dict) or not is_int(meta.get("update")):
            raise ValueError(f"{meta_file} is not a PPO checkpoint record (needs an integer 'update'); delete "
                             f"{self.folder} to start over")
        return meta

    def latest_update(self) -> int | None:
        """The update index of the latest checkpoint (None when there is none)."""
        f = self.latest()
        return None if f is None else int(self._meta(f)["update"])

    def restore(self, template: Any) -> tuple[Any, int]:
        """(runner, update) from the latest checkpoint, or (template, 0) when there is none."""
        meta_file = self.latest()
        if meta_file is None:
            return template, 0
        from qpolicy.rundir import check_fingerprint

        meta = self._meta(meta_file)
        check_fingerprint(meta.get("fingerprint"), self.fingerprint or meta.get("fingerprint"),
                          what=f"checkpoint {meta_file.name}", where=self.folder)
        raw = load_pytree(meta_file.with_suffix(".msgpack"), what="PPO checkpoint")
        leaves, treedef = jax.tree_util.tree_flatten(template)
        got = [raw.get(str(i)) for i in range(len(leaves))] if isinstance(raw, dict) else []
        out = []
        for i, (t, g) in enumerate(zip(leaves, got)):
            is_key = jnp.issubdtype(t.dtype, jax.dtypes.prng_key)
            want = jax.random.key_data(t).shape if is_key else t.shape
            if g is None or tuple(np.shape(g)) != tuple(want):
                raise ValueError(f"{meta_file.with_suffix('.msgpack')} does not match this run (leaf {i}: "
                                 f"{None if g is None else np.shape(g)} vs {tuple(want)}); delete "
                                 f"{self.folder} to start over")
            out.append(jax.random.wrap_key_data(jnp.asarray(g), impl=jax.random.key_impl(t)) if is_key
                       else jnp.asarray(g, t.dtype))
        if len(got) != len(leaves):
            raise ValueError(f"{meta_file.with_suffix('.msgpack')} does not match this run; delete {self.folder}")
        self.last = int(meta["update"])
        return jax.tree_util.tree_unflatten(treedef, out), self.last

    def maybe_save(self, runner: Any, update: int, *, final: bool = False) -> Path | None:
        if not final and update - self.last < self.every:
            return None
        host = [np.asarray(jax.random.key_data(x)) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                else np.asarray(x) for x in jax.tree_util.tree_leaves(runner)]
        name = self.folder / f"ppo_{update:08d}"
        old = list(self.folder.glob("ppo_*"))
        save_pytree(name.with_suffix(".msgpack"), {str(i): x for i, x in enumerate(host)})
        atomic_write_json(name.with_suffix(".json"), {"update": int(update), "fingerprint": self.fingerprint})
        for f in old:  # keep only the newest (written first, so a kill leaves at least one complete checkpoint)
            if f.stem != name.name:
                f.unlink(missing_ok=True)
        self.last = update
        return name


def save_policy(path: str | Path, params: Any, cfg: PPOConfig, core_meta: Mapping) -> Path:
    """Write a policy folder ``path``: ``policy.msgpack`` (params) and ``policy.json`` (format, config,
    core metadata; see :func:`core_meta`). Both files are written atomically, JSON last."""
    if not isinstance(cfg, PPOConfig):
        raise ValueError(f"cfg must be a PPOConfig, got {type(cfg).__name__}")
    if not isinstance(core_meta, Mapping):
        raise ValueError(f"core_meta must be a dict (see qpolicy.agents.ppo_jax.core_meta), got "
                         f"{type(core_meta).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_pytree(path / WEIGHTS_FILE, params)
    atomic_write_json(path / META_FILE, {"format": POLICY_FORMAT, "version": POLICY_VERSION,
                                         "config": cfg.to_dict(), "meta": dict(core_meta)})
    return path


def load_policy(path: str | Path) -> tuple[Any, PPOConfig, dict]:
    """Read a folder written by :func:`save_policy` -> (params (jax arrays), cfg, meta).

    Raises FileNotFoundError for a missing folder/file and ValueError for a corrupt or foreign one, or for
    params whose shapes do not match the saved config and metadata."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"policy folder not found: {path} (expected {META_FILE} and {WEIGHTS_FILE})")
    doc = read_json(path / META_FILE, what="policy metadata")
    if not isinstance(doc, dict) or doc.get("format") != POLICY_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path / META_FILE}: field 'format' is {got!r}, expected {POLICY_FORMAT!r}")
    if doc.get("version") != POLICY_VERSION:
        raise ValueError(f"{path / META_FILE}: field 'version' is {doc.get('version')!r}, "
                         f"this reader supports {POLICY_VERSION}")
    for k in ("config", "meta"):
        if not isinstance(doc.get(k), dict):
            raise ValueError(f"{path / META_FILE} lacks the object field {k!r}")
    cfg = PPOConfig.from_dict(doc["config"])
    meta = doc["meta"]
    raw = load_pytree(path / WEIGHTS_FILE, what="policy weights")
    params = jax.tree_util.tree_map(jnp.asarray, raw)
    if "obs_size" in meta and "action_nvec" in meta:
        nvec, _ = _action_spec(meta)
        ref = jax.eval_shape(ActorCritic(nvec=nvec, hidden=cfg.hidden).init, jax.random.key(0),
                             jnp.zeros((int(meta["obs_size"]),), jnp.float32))
        ok = jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(params) and all(
            tuple(a.shape[-len(b.shape):]) == tuple(b.shape)
            for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)))
        if not ok:
            raise ValueError(f"{path / WEIGHTS_FILE} does not match the saved config/metadata (hidden="
                             f"{cfg.hidden}, obs_size={meta['obs_size']}, action_nvec={meta['action_nvec']})")
    return params, cfg, meta
