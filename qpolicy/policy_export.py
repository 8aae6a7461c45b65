"""The input-adaptive policy as a deployable artifact: its network as ONNX plus the exact observation recipe.

:func:`export_policy_onnx` converts a JAX-PPO policy folder (``policy.json`` + ``policy.msgpack``) with jax2onnx
into ``policy.onnx``: input ``obs`` (B, D) float32, outputs ``action`` (B, H) int32 (the deterministic policy: the
argmax of each head, as ``qpolicy evaluate`` rolls it) and ``bits`` (B, H) int32 (``bit_choices[action]``).
``observation.json`` names every observation entry in order (``qpolicy.envs.observation.obs_names``), with the env
config that fixes how they are computed (thumbnail size, choice set, tied W/A, layer-wise or per-step) and the
action -> bits rule; ``qpolicy.envs.core``'s module docstring defines each entry. SB3 policies (``policy.zip``)
are not converted.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from .io import atomic_write_bytes, atomic_write_json
from .onnx_export import _require

POLICY_ONNX = "policy.onnx"
OBS_RECIPE = "observation.json"


def export_policy_onnx(policy_dir: str | os.PathLike, out_dir: str | os.PathLike, *, batch: int = 1
                       ) -> list[Path]:
    """Write ``policy.onnx`` and ``observation.json`` for the JAX-PPO policy in ``policy_dir``; returns both."""
    jax2onnx = _require("jax2onnx")
    from .agents.ppo_checkpoint import load_policy
    from .agents.ppo_networks import ActorCritic, _action_spec, _MultiCategorical
    from .denoiser import load_denoiser
    from .envs.observation import obs_names

    params, cfg, meta = load_policy(policy_dir)
    nvec, scalar = _action_spec(meta)
    env = meta.get("env_config", {})
    choices = jnp.asarray(env["bit_choices"], jnp.int32)
    net = ActorCritic(nvec=nvec, hidden=cfg.hidden)
    p0 = jax.tree_util.tree_map(lambda a: a[0] if a.ndim and cfg.num_seeds > 1 else a, params)
    profiles = meta.get("profiles")  # action_space 'profiles': action = profile index, bits = that profile's
    table = None
    if profiles is not None:
        import numpy as np

        from .profiles import profiles_from_dict

        prof = profiles_from_dict(profiles, source=f"{policy_dir}/policy.json meta.profiles")
        tied = bool(env.get("tie_weights_activations", True))
        table = jnp.asarray(prof.bits_w if tied else np.concatenate([prof.bits_w, prof.bits_a], 1), jnp.int32)

    def act(obs):
        logits, _ = net.apply(p0, obs)
        a = _MultiCategorical(logits, nvec).mode()
        a = a[..., :1] if scalar else a
        return a, (choices[a] if table is None else table[a[..., 0]])

    D = int(meta["obs_size"])
    model = jax2onnx.to_onnx(act, [jax.ShapeDtypeStruct((batch, D), jnp.float32)], model_name="qpolicy_policy",
                             input_names=["obs"], output_names=["action", "bits"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layerwise = bool(meta.get("layerwise", False))
    tied = bool(env.get("tie_weights_activations", True))
    den = load_denoiser(env["model"])
    names = obs_names(image_channels=den.image_shape[-1], thumb_size=int(env["thumb_size"]),
                      num_layers=len(den.layers), tied=tied, layerwise=layerwise,
                      request_names=den.conditioning.feature_names() if den.conditioning is not None else ())
    if len(names) != D:
        raise ValueError(f"the policy's obs_size {D} does not match the observation layout of its env config "
                         f"({len(names)} entries)")
    recipe = {"format": "qpolicy-policy-observation", "obs_size": D, "obs_names": names, "env_config": env,
              "conditioning": den.conditioning.to_dict() if den.conditioning is not None else None,
              "layers": [l.path for l in den.layers], "layerwise": layerwise, "tied_weights_activations": tied,
              "definitions": "qpolicy.envs.core module docstring (every entry); qpolicy.envs.observation (code)",
              "action": {"heads": list(nvec), "bits": "bits = bit_choices[action]; per-step env: one head per layer "
                         "(weights = activations when tied); layer-wise env: one action per (step, layer)",
                         "bit_choices": env["bit_choices"]},
              "onnx": {"file": POLICY_ONNX, "input": "obs (B, D) float32", "batch": batch,
                       "outputs": ["action (B, H) int32", "bits (B, H) int32"]}}
    if table is not None:
        recipe["action"] = {"heads": list(nvec), "action_space": "profiles", "profiles": profiles,
                            "bits": "action (B, 1) = the profile index k; bits (B, L) = profile k's bits_w (tied), or "
                                    "(B, 2L) = [bits_w | bits_a]; prev_bits_* observation entries hold the previous "
                                    "step's profile bits", "bit_choices": env["bit_choices"]}
        recipe["onnx"]["outputs"] = ["action (B, 1) int32", f"bits (B, {int(table.shape[1])}) int32"]
    return [atomic_write_bytes(out / POLICY_ONNX, model.SerializeToString()),
            atomic_write_json(out / OBS_RECIPE, recipe)]
