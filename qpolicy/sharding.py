"""Many devices, one code path: the env batch split over a 1-D device mesh with ``jax.sharding``.

Every batched env array (env states, observations, episode returns, rollouts: env axis ``n = num_envs``) is split
over the mesh axis ``"envs"``; everything else (agent params, optimizer state, env params such as the reference
bank, RNG keys) is replicated. XLA's SPMD partitioner then runs each device's slice of the env batch (the
quantized denoiser forwards, which dominate the cost) on that device and inserts the collectives the agent needs
(gradient all-reduce, the minibatch shuffle). One device is a mesh of one: the same code, the same results.

    es = env_sharding(num_envs=64)             # all local devices if they divide 64, else one
    states = es.put_envs(states)               # (64, ...) -> 64 / es.size rows per device
    params = es.put_replicated(params)
    x = es.constrain(x, axis=1)                # inside jit: keep a (T, 64, ...) rollout split on axis 1

Multi-host (``jax.distributed.initialize()`` before anything else touches jax): the mesh here is built over
``jax.local_devices()``, so each process shards its own env batch over its own devices and trains independently
(e.g. one seed or one sweep trial per host); a mesh over the global ``jax.devices()`` is not supported because
the drivers read metrics and checkpoints back with ``np.asarray`` (fully addressable arrays only).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXIS", "EnvSharding", "plan_devices", "env_sharding"]

#: name of the mesh axis the env batch is split over
AXIS = "envs"


def plan_devices(num_envs: int, devices: int | None, available: int) -> int:
    """How many devices to split ``num_envs`` envs over.

    devices: None = automatic (all ``available`` devices when they divide num_envs, else 1 with a warning);
    an int n = exactly n (ValueError when n exceeds ``available`` or does not divide num_envs)."""
    if devices is None:
        if num_envs % available == 0:
            return available
        warnings.warn(f"num_envs ({num_envs}) is not divisible by the local device count ({available}); running "
                      f"on one device (set devices to a divisor of num_envs, or num_envs to a multiple of "
                      f"{available}, to shard)", stacklevel=3)
        return 1
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or devices < 1:
        raise ValueError(f"devices must be None (all local devices) or an integer >= 1, got {devices!r}")
    if devices > available:
        raise ValueError(f"devices ({devices}) exceeds the local device count ({available}, jax.local_devices())")
    if num_envs % devices:
        ok = [d for d in range(1, available + 1) if num_envs % d == 0]
        raise ValueError(f"num_envs ({num_envs}) is not divisible by the device count ({devices}): the env batch "
                         f"is split evenly over devices; use num_envs a multiple of {devices} or devices in {ok}")
    return int(devices)


@dataclasses.dataclass(frozen=True)
class EnvSharding:
    """Shardings of one 1-D mesh (axis :data:`AXIS`); hashable, so jitted functions can be cached per mesh."""

    mesh: Mesh

    @property
    def size(self) -> int:
        """Number of devices in the mesh."""
        return int(self.mesh.devices.size)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def envs(self, axis: int = 0) -> NamedSharding:
        """Split along ``axis`` (the env axis), every other axis whole."""
        return NamedSharding(self.mesh, P(*([None] * axis), AXIS))

    def _leaf(self, x: Any, axis: int) -> NamedSharding:
        # a leaf without the env axis (or one that does not split evenly) stays whole on every device
        shape = np.shape(x) if not hasattr(x, "shape") else x.shape
        if len(shape) <= axis or shape[axis] % self.size:
            return self.replicated
        return self.envs(axis)

    def tree_envs(self, tree: Any, axis: int = 0) -> Any:
        """A tree of shardings like ``tree`` (arrays or ShapeDtypeStructs) split along ``axis``."""
        return jax.tree_util.tree_map(lambda x: self._leaf(x, axis), tree)

    def state_shardings(self, state: Any, env_fields: Sequence[str], axis: int = 0) -> Any:
        """Shardings of a ``flax.struct`` state: fields ``env_fields`` split along ``axis``, the rest replicated."""
        out = {}
        for f in dataclasses.fields(state):
            v = getattr(state, f.name)
            out[f.name] = (self.tree_envs(v, axis) if f.name in env_fields
                           else jax.tree_util.tree_map(lambda _: self.replicated, v))
        return state.replace(**out)

    def put_envs(self, tree: Any, axis: int = 0) -> Any:
        """``device_put`` with the env axis ``axis`` split over the mesh."""
        return jax.device_put(tree, self.tree_envs(tree, axis))

    def put_replicated(self, tree: Any) -> Any:
        """``device_put`` a whole copy on every device (None and empty trees pass through)."""
        return jax.device_put(tree, self.replicated) if jax.tree_util.tree_leaves(tree) else tree

    def constrain(self, tree: Any, axis: int = 0) -> Any:
        """Inside jit: ask XLA to keep the env axis ``axis`` of every leaf split (a no-op on one device)."""
        return jax.lax.with_sharding_constraint(tree, self.tree_envs(tree, axis))

    # The env steps go through shard_map, not the automatic SPMD partitioner: each device runs the env's own
    # vmapped step on its slice. XLA's partitioner (jax 0.10.2, CPU) miscompiles the per-env 1x1 convolutions of
    # a quantized denoiser (vmapped kernels become a grouped convolution whose partitioned form all-gathers the
    # input features but keeps one kernel group: wrong results). Per-env keys are split before the device split,
    # so each env gets the same key on any number of devices.
    def _map_envs(self, fn, n_split: int):
        # check_vma off: an env's code is written for plain arrays (e.g. the layer-wise core's lax.cond, whose
        # branches mix per-env values and constants); every output is per env, hence split on AXIS
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(AXIS),) * n_split + (P(),), out_specs=P(AXIS),
                             check_vma=False)

    def reset_batch(self, core: Any, key: jax.Array, params: Any, num_envs: int):
        """``core.reset_batch(key, params, num_envs)`` with the envs split over the mesh -> (obs (n, D), states)."""
        return self._map_envs(core.reset_batch_keys, 1)(jax.random.split(key, num_envs), params)

    def step_batch(self, core: Any, key: jax.Array, states: Any, actions: jax.Array, params: Any):
        """``core.step_batch(key, states, actions, params)`` with the envs split over the mesh (same results)."""
        keys = jax.random.split(key, actions.shape[0])
        return self._map_envs(core.step_batch_keys, 3)(keys, states, actions, params)


def _local_devices(devices: Any) -> list:
    if devices is None or isinstance(devices, (int, np.integer)):
        return list(jax.local_devices())
    devs = list(devices)
    if not devs or not all(isinstance(d, jax.Device) for d in devs):
        raise ValueError(f"devices must be None, an integer or a non-empty sequence of jax devices, got {devices!r}")
    return devs


def env_sharding(num_envs: int, devices: int | Sequence[jax.Device] | None = None) -> EnvSharding:
    """The :class:`EnvSharding` for a batch of ``num_envs`` envs.

    devices: None = all local devices when they divide num_envs, else one (with a warning); an int n = the first n
    local devices (ValueError naming num_envs and n when n does not divide num_envs or exceeds the local devices);
    a sequence of devices = exactly those (its length must divide num_envs)."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    avail = _local_devices(devices)
    want = devices if devices is None or isinstance(devices, (int, np.integer)) else len(avail)
    n = plan_devices(int(num_envs), want, len(avail))
    return EnvSharding(Mesh(np.asarray(avail[:n]), (AXIS,)))
