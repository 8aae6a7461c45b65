"""Many devices, one code path (qpolicy.sharding): JAX PPO and the vector env on 4 forced host devices give the
results of 1 device, with the env batch really split; bad device counts are refused with a clear message.

The multi-device checks run in a subprocess: ``--xla_force_host_platform_device_count`` only takes effect when it
is set before jax initialises its backends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qpolicy.sharding import env_sharding, plan_devices

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(r"""
    import json, sys, time, warnings
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])  # tests/: the tiny random U-Net of conftest, the bandit of test_ppo_jax
    from conftest import random_params
    from test_ppo_jax import BanditCore
    from qpolicy.agents.ppo_jax import PPOConfig, train
    from qpolicy.denoiser import wrap_denoiser
    from qpolicy.diffusion import make_schedule
    from qpolicy.envs import QuantDiffusionVectorEnv, make_core, make_sb3_vec_env
    from qpolicy.models import UNet, preset_config

    T0, mode = time.time(), sys.argv[2]
    log = lambda what: print(f"{what}: {time.time() - T0:.1f} s", file=sys.stderr, flush=True)
    out = {"devices": len(jax.devices())}
    flat = lambda t: [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(t)]

    def ppo(core, cfg, name):
        for n in (1, 4):
            res = train(core, cfg.replace(devices=n), progress=False, num_chunks=3)
            leaves = jax.tree_util.tree_leaves(res.runner.env_state) + [res.runner.obs, res.runner.ep_return]
            out[f"{name}{n}"] = {
                "params": flat(res.params), "metrics": {k: v.tolist() for k, v in res.metrics.items()},
                "trace_counts": res.trace_counts, "devices": res.devices,
                "state_devices": sorted({len(x.sharding.device_set) for x in leaves}),
                "obs_shard": list(res.runner.obs.addressable_shards[0].data.shape)}

    def tiny_kw():
        module = UNet(preset_config("tiny", image_size=8, in_channels=1))
        den = wrap_denoiser(module, {"params": random_params(module, (8, 8, 1))}, image_shape=(8, 8, 1),
                            schedule=make_schedule("linear", 100), name="tiny")
        # bits 16 and 32 only: the per-device batch sizes differ, so XLA's convolutions round differently in the
        # last float bit; at 2-4 bits that can flip a rounding decision and move a value by a quantization step
        return dict(model=den, num_steps=2, images_per_env=2, bank_size=8, quant_preset="plain",
                    bit_choices=(16, 32))

    if mode == "fast":
        # PPO on the bandit of test_ppo_jax: 2 seeds (vmapped) and 1 seed (the unvmapped driver path)
        bandit = PPOConfig(num_envs=8, num_steps=4, total_timesteps=8 * 4 * 6, lr=3e-3, hidden=(16,), num_seeds=2)
        ppo(BanditCore(), bandit, "bandit")
        ppo(BanditCore(), bandit.replace(num_seeds=1), "bandit_1seed")
        with warnings.catch_warnings(record=True) as caught:  # automatic: 6 envs on 4 devices -> one device
            warnings.simplefilter("always")
            out["auto6"] = train(BanditCore(), PPOConfig(num_envs=6, num_steps=2, total_timesteps=12, hidden=(4,),
                                                         num_minibatches=1), progress=False, num_chunks=1).devices
            out["auto6_warning"] = " ".join(str(w.message) for w in caught)
        log("bandit ppo")
        kw = tiny_kw()
        for name, fn in (("ppo_err", lambda: train(BanditCore(), bandit.replace(num_envs=6, devices=4))),
                         ("venv_err", lambda: QuantDiffusionVectorEnv(6, devices=4, **kw)),
                         ("sb3_err", lambda: make_sb3_vec_env(6, devices=4, **kw))):
            try:
                fn()
                out[name] = None
            except ValueError as e:
                out[name] = str(e)
        core = make_core(**kw)
        rng = np.random.default_rng(0)
        acts = [rng.integers(0, core.C, (8, core.L)) for _ in range(3)]  # an episode (T=2), then an autoreset
        lw_acts = [rng.integers(0, core.C, 8) for _ in range(core.L + 1)]
        for n in (1, 4):
            venv = QuantDiffusionVectorEnv(8, devices=n, **kw)
            rows = [venv.reset(seed=7)[0].tolist()]
            for a in acts:
                obs, r, term, trunc, info = venv.step(a)
                rows += [obs.tolist(), r.tolist(), term.tolist(), info["cost"].tolist(), info["error"].tolist()]
            out[f"venv{n}"] = {"rows": rows, "x_devices": len(venv._states.x.sharding.device_set),
                               "x_shard": list(venv._states.x.addressable_shards[0].data.shape)}
            sb3 = make_sb3_vec_env(8, devices=n, seed=3, **kw)  # shares the vector env's compiled step
            o = [sb3.reset().tolist()] + [sb3.step(a)[0].tolist() for a in acts[:2]]
            out[f"sb3_{n}"] = {"obs": o, "x_devices": len(sb3._states.x.sharding.device_set)}
            # layer-wise env (a lax.cond per batched step, run per device): one sampler step's L decisions + 1
            lw = QuantDiffusionVectorEnv(8, devices=n, layerwise=True, **kw)
            rows = [lw.reset(seed=5)[0].tolist()]
            for a in lw_acts:
                obs, r, *_ = lw.step(a)
                rows += [obs.tolist(), r.tolist()]
            out[f"lw{n}"] = {"rows": rows, "x_devices": len(lw._states.x.sharding.device_set)}
        log("vector envs")
    else:  # PPO on the tiny diffusion core (the shard_map'ed env step inside the jitted update)
        core = make_core(**tiny_kw())
        ppo(core, PPOConfig(num_envs=4, num_steps=4, total_timesteps=4 * 4 * 3, num_minibatches=2,
                            update_epochs=2, hidden=(16,)), "ppo")
        log("diffusion ppo")
    print("RESULT" + json.dumps(out))
""")


def _four_devices(mode: str, cwd: Path) -> dict:
    """Run CHILD in ``mode`` on 4 forced host devices and return its JSON."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "tests"), mode], env=env, capture_output=True,
                          text=True, timeout=900, cwd=cwd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(lines[-1][len("RESULT"):])
    assert res["devices"] == 4
    return res


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> dict:
    """The bandit PPO runs, the refusals and the tiny diffusion vector envs (about 50 s of CPU on 2 cores)."""
    return _four_devices("fast", tmp_path_factory.mktemp("shard"))


def _check_ppo(one: dict, four: dict, atol: float) -> None:
    assert (one["devices"], four["devices"]) == (1, 4)
    # env states, observations and returns really are split over the 4 devices (env axis 1, after the seeds)
    assert four["state_devices"] == [4] and one["state_devices"] == [1]
    assert four["obs_shard"][1] * 4 == one["obs_shard"][1]
    assert one["trace_counts"] == four["trace_counts"] == {"update": 1}  # 3 chunks, one compile
    assert len(one["params"]) == len(four["params"])
    for a, b in zip(one["params"], four["params"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=atol)
    assert one["metrics"].keys() == four["metrics"].keys()
    for k, v in one["metrics"].items():
        np.testing.assert_allclose(np.asarray(four["metrics"][k], float), np.asarray(v, float), rtol=1e-5,
                                   atol=atol, err_msg=k)


@pytest.mark.parametrize("name", ["bandit", "bandit_1seed"])
def test_ppo_four_devices_equals_one(four_devices, name):
    _check_ppo(four_devices[f"{name}1"], four_devices[f"{name}4"], atol=1e-6)
    assert np.asarray(four_devices[f"{name}4"]["metrics"]["episode_return"]).shape[1] == 6


def test_vector_env_four_devices_equals_one(four_devices):
    one, four = four_devices["venv1"], four_devices["venv4"]
    assert four["x_devices"] == 4 and four["x_shard"][0] == 2 and one["x_devices"] == 1
    assert len(one["rows"]) == len(four["rows"])
    for a, b in zip(one["rows"], four["rows"]):  # atol: float rounding of other per-device batch sizes
        np.testing.assert_allclose(np.asarray(b, float), np.asarray(a, float), rtol=1e-5, atol=1e-4)
    assert four_devices["sb3_4"]["x_devices"] == 4 and four_devices["lw4"]["x_devices"] == 4
    for a, b in zip(four_devices["lw1"]["rows"], four_devices["lw4"]["rows"]):
        np.testing.assert_allclose(np.asarray(b, float), np.asarray(a, float), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(four_devices["sb3_4"]["obs"]), np.asarray(four_devices["sb3_1"]["obs"]),
                               rtol=1e-5, atol=1e-4)


def test_indivisible_num_envs_refused_when_asked(four_devices):
    for name in ("ppo_err", "venv_err", "sb3_err"):
        msg = four_devices[name]
        assert msg is not None, f"{name}: 6 envs on devices=4 was accepted"
        assert "num_envs (6)" in msg and "device count (4)" in msg, msg
    # devices=None falls back to one device, saying why
    assert four_devices["auto6"] == 1
    assert "num_envs (6)" in four_devices["auto6_warning"] and "(4)" in four_devices["auto6_warning"]


@pytest.mark.slow
def test_diffusion_ppo_four_devices_equals_one(tmp_path):
    """The jitted PPO update with the tiny quantized-diffusion env stepped per device (about 2 min of CPU)."""
    res = _four_devices("diffusion_ppo", tmp_path)
    _check_ppo(res["ppo1"], res["ppo4"], atol=2e-5)


def test_plan_devices_rules():
    assert plan_devices(8, None, 4) == 4 and plan_devices(8, 2, 4) == 2 and plan_devices(7, None, 1) == 1
    with pytest.raises(ValueError, match=r"num_envs \(6\) is not divisible by the device count \(4\)"):
        plan_devices(6, 4, 4)
    with pytest.raises(ValueError, match=r"devices \(8\) exceeds the local device count \(4"):
        plan_devices(8, 8, 4)
    with pytest.raises(ValueError, match="devices must be None"):
        plan_devices(8, 0, 4)
    with pytest.warns(UserWarning, match=r"num_envs \(6\) is not divisible by the local device count \(4\)"):
        assert plan_devices(6, None, 4) == 1


def test_one_device_mesh_in_process():
    es = env_sharding(4)
    assert es.size == len(__import__("jax").local_devices())
    x = es.put_envs(np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(np.asarray(x), np.arange(8.0).reshape(4, 2))
    with pytest.raises(ValueError, match="num_envs must be an integer"):
        env_sharding(0)


def test_device_count_not_in_run_fingerprint():
    from qpolicy.runs import RunConfig

    base = RunConfig(agent="ppo_jax", agent_kwargs={"num_steps": 8})
    assert RunConfig(agent="ppo_jax", agent_kwargs={"num_steps": 8, "devices": 2}).fingerprint() == base.fingerprint()
    assert RunConfig(agent="ppo_jax", agent_kwargs={"num_steps": 16}).fingerprint() != base.fingerprint()
