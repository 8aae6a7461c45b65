"""The profile action space (env.action_space: profiles): parity with the bits env, the profiles file format and its
errors, the search (budgets, dedup, cache), run fingerprints, config refusals, and a run end to end (slow).
Tiny random U-Net 8x8, T=3, choice set (4, 8, 32)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import qpolicy.envs as E
from qpolicy.profiles import (PROFILES_FILE, ProfileError, Profiles, find_profiles, load_profiles, profile_budgets,
                              profiles_from_dict)
from qpolicy.runs import RunConfig

T = 3
CHOICES = (4, 8, 32)
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("module_cache")  # one cache per module (conftest)


@pytest.fixture(scope="module")
def kw(tiny_denoiser):
    return dict(model=tiny_denoiser, num_steps=T, bank_size=8, images_per_env=2, bit_choices=CHOICES,
                quant_preset="plain")


def _profiles(den, rows_w, rows_a=None, tied=True) -> Profiles:
    bw = np.asarray(rows_w, np.int32)
    return Profiles(bits_w=bw, bits_a=np.asarray(rows_a if rows_a is not None else rows_w, np.int32),
                    model_id=den.name, layer_hash=den.layer_hash, layer_names=tuple(l.path for l in den.layers),
                    bit_choices=CHOICES, tied=tied)


@pytest.fixture(scope="module")
def pfile(tiny_denoiser, tmp_path_factory):
    """Three tied profiles: all 4 bits, mixed 4/8, all 32 (float)."""
    L = len(tiny_denoiser.layers)
    mixed = np.where(np.arange(L) % 2 == 0, 4, 8)
    return _profiles(tiny_denoiser, [[4] * L, mixed, [32] * L]).save(tmp_path_factory.mktemp("p") / "p.json")


@pytest.mark.parametrize("tied", [True, False])
def test_profile_step_equals_bits_step(kw, pfile, tiny_denoiser, tmp_path, tied):
    """Stepping the profile env with k equals stepping the bits env with profile k's indices: observations (the
    prev-bits block included), rewards, info and states, over a whole episode."""
    f = pfile
    if not tied:  # separate W/A bits: a profile with W != A
        L = len(tiny_denoiser.layers)
        f = _profiles(tiny_denoiser, [[4] * L, [8] * L], [[8] * L, [32] * L], tied=False).save(tmp_path / "u.json")
    pk = dict(kw, tie_weights_activations=tied)
    pcore = E.make_core(action_space="profiles", profiles=str(f), **pk)
    bcore = E.make_core(**pk)
    assert pcore.engine is bcore.engine and isinstance(pcore, E.QuantDiffusionProfileCore)
    assert pcore.action_space().n == pcore.K and pcore.obs_spec() == bcore.obs_spec()
    params = bcore.default_params
    key = jax.random.key(3)
    iw, ia = pcore.profiles.indices()
    (po, ps), (bo, bs) = pcore.jit_reset(key, params), bcore.jit_reset(key, params)
    for k in [1, 0, pcore.K - 1][:T]:
        ba = iw[k] if tied else np.concatenate([iw[k], ia[k]])
        po, ps, pr, pt, _, pi = pcore.jit_step_env(key, ps, jnp.asarray(k, jnp.int32), params)
        bo, bs, br, bt, _, bi = bcore.jit_step_env(key, bs, jnp.asarray(ba, jnp.int32), params)
        np.testing.assert_array_equal(np.asarray(po), np.asarray(bo))
        assert float(pr) == float(br) and bool(pt) == bool(bt)
        for name in pi:
            assert float(pi[name]) == float(bi[name]), name
        np.testing.assert_array_equal(np.asarray(ps.prev_w), iw[k])
    assert bool(pt)
    np.testing.assert_array_equal(pcore.action_indices(np.array([[1], [0]]))[0], iw[[1, 0]])
    np.testing.assert_array_equal(pcore.action_indices(np.array([1, 0]))[1], ia[[1, 0]])


def test_gymnasium_and_sb3_check_env(kw, pfile):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = E.QuantDiffusionEnv(action_space="profiles", profiles=str(pfile), **kw)
    check_env(env, skip_render_check=True)
    assert env.action_space.n == 3
    sb3_check(env)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"indices in \[0, 2\] into the 3 precision profiles"):
        env.step(3)


def _doc(den, **change):
    L = len(den.layers)
    d = _profiles(den, [[4] * L, [8] * L]).to_dict()
    d.update(change)
    return d


def test_bad_profile_files_name_the_field(tiny_denoiser, tmp_path, kw):
    den = tiny_denoiser
    L = len(den.layers)
    expect = dict(layer_names=[l.path for l in den.layers], layer_hash=den.layer_hash, bit_choices=CHOICES, tied=True)
    cases = [
        (dict(format="x"), "format must be 'qpolicy-precision-profiles'"),
        (dict(version=2), "version must be 1"),
        (dict(layer_names=[l.path for l in den.layers][:-1]), f"the file has {L - 1} layers but the env's model "
                                                               f"has {L}"),
        (dict(layer_hash="abc"), "layer_hash abc differs"),
        (dict(profiles=[{"bits_w": [4] * (L - 1)}]), rf"profiles\[0\].bits_w has {L - 1} entries; the model has {L}"),
        (dict(profiles=[{"bits_w": [4] * (L - 1) + [6]}]), rf"profiles\[0\].bits_w\[{L - 1}\] = 6 .* not in "
                                                            r"bit_choices \[4, 8, 32\]"),
        (dict(profiles=[{"bits_w": [4.5] * L}]), r"profiles\[0\].bits_w must hold integers"),
        (dict(profiles=[{"bits_w": [4] * L}, {"bits_w": [4] * L}]), r"profiles\[1\] repeats profiles\[0\]"),
        (dict(profiles=[{"bits_w": [4] * L, "bits_a": [8] * L}]), r"tied profiles need bits_a == bits_w"),
        (dict(profiles=[]), "must be a list of 1..64 profiles"),
        (dict(profiles=[{"bits_a": [4] * L}]), r"profiles\[0\].bits_w is missing"),
        (dict(tied="yes"), "tied must be true or false"),
        (dict(tied=False, profiles=[{"bits_w": [4] * L, "bits_a": [8] * L}]), "the env ties weights and activ"),
    ]
    for change, msg in cases:
        with pytest.raises(ProfileError, match=msg):
            profiles_from_dict(_doc(den, **change), **expect)
    with pytest.raises(ProfileError, match="a profiles file must hold a JSON object"):
        profiles_from_dict([1], **expect)
    # through the env config: the file and field are named; a missing file says how to make one
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_doc(den, profiles=[{"bits_w": [5] * L}])))
    with pytest.raises(ProfileError, match=rf"{bad}: profiles\[0\].bits_w\[0\] = 5"):
        E.make_core(action_space="profiles", profiles=str(bad), **kw)
    with pytest.raises(FileNotFoundError, match="qpolicy profiles"):
        load_profiles(tmp_path / "none.json")
    ok = profiles_from_dict(_doc(den), **expect)  # bits_a may be left out when tied
    assert ok.K == 2 and np.array_equal(ok.bits_a, ok.bits_w)


def test_config_refusals(kw, pfile):
    with pytest.raises(ValueError, match="action_space must be one of"):
        E.EnvConfig(action_space="bops")
    with pytest.raises(ValueError, match="num_profiles apply to action_space 'profiles' only"):
        E.EnvConfig(num_profiles=3)
    with pytest.raises(ValueError, match="profiles apply to action_space 'profiles' only"):
        E.EnvConfig(profiles="p.json")
    with pytest.raises(ValueError, match="num_profiles must be an integer >= 1"):
        E.EnvConfig(action_space="profiles", num_profiles=0)
    with pytest.raises(ValueError, match="use the per-step env"):
        E.make_core(layerwise=True, action_space="profiles", profiles=str(pfile), **kw)
    env = {"action_space": "profiles", "profiles": str(pfile)}
    with pytest.raises(ValueError, match="needs the per-step env and a discrete agent"):
        RunConfig(agent="ppo_jax", layerwise=True, env=env)
    with pytest.raises(ValueError, match="got agent 'sac'"):
        RunConfig(agent="sac", env=env)


def test_existing_fingerprints_unchanged():
    """The profile fields enter a run's fingerprint only when set: the committed runs keep theirs."""
    pinned = {"cpu/digits16_ppo_jax_demo": "ac0d367c36071cdc", "h100/digits16_ppo_jax_gpu": "3b734226c5501f81",
              "h100/patches32_ppo_jax": "91d2f5e0d6684111"}
    for run, fp in pinned.items():
        d = yaml.safe_load((ROOT / "experiments" / "results" / run / "config.yaml").read_text())
        d.pop("fingerprint", None)
        assert RunConfig(**d).fingerprint() == fp, run
        d["env"] = {**d["env"], "action_space": "bits"}  # the default, written out: the same run
        assert RunConfig(**d).fingerprint() == fp
        d["env"] = {**d["env"], "action_space": "profiles"}
        prof = RunConfig(**d).fingerprint()
        assert prof != fp
        assert RunConfig(**{**d, "env": {**d["env"], "num_profiles": 8}}).fingerprint() != prof


def test_search_budgets_dedup_and_order(kw):
    """find_profiles: one ILP per budget spread geometrically around the target, duplicates dropped, ascending
    cost, each within its budget; the same inputs give the same profiles."""
    from qpolicy.agents.budget import schedule_cost
    from qpolicy.envs import registry

    b = profile_budgets(0.1, 4, 2.0, 0.01, 1.0)
    np.testing.assert_allclose(b, [0.1 / 2 ** 1.5, 0.1 / 2 ** 0.5, 0.1 * 2 ** 0.5, 0.1 * 2 ** 1.5])
    assert profile_budgets(0.1, 3, 10.0, 0.05, 0.5) == [0.05, 0.1, 0.5]
    eng = registry.engine_for(E.EnvConfig(**kw))
    L = eng.num_layers
    sens = np.linspace(1, 2, L)[:, None] * np.array([1.0, 0.1, 0.0])[None]  # fewer bits hurt, later layers more
    p = find_profiles(eng, num_profiles=4, budget=0.1, spread=2.0, sens=sens)
    assert 2 <= p.K <= 4 and list(p.costs) == sorted(p.costs)
    assert len({r.tobytes() for r in p.bits_w}) == p.K
    for k in range(p.K):
        assert p.costs[k] <= p.budgets[k] * (1 + 1e-9)
        assert p.costs[k] == pytest.approx(schedule_cost(eng, p.bits_w[k][None], p.bits_a[k][None]))
    again = find_profiles(eng, num_profiles=4, budget=0.1, spread=2.0, sens=sens)
    assert again.same_bits(p)
    # a huge spread clips to the achievable range; equal budgets collapse to one profile
    one = find_profiles(eng, num_profiles=3, budget=0.1, spread=1.0 + 1e-12, sens=sens)
    assert one.K == 1


def test_cli_writes_searched_profiles(tiny_denoiser, tmp_path, monkeypatch, capsys):
    """`qpolicy profiles` writes the file the training run's search would resolve to (sensitivity stubbed: the
    ILP and the file are what is tested here); a profile-mode env then loads it."""
    from qpolicy.agents import sensitivity
    from qpolicy.cli import main
    from qpolicy.denoiser import save_checkpoint

    ck = save_checkpoint(tmp_path / "ck", module=tiny_denoiser.module, params=tiny_denoiser.params,
                         schedule=tiny_denoiser.schedule, dataset="digits", image_shape=(8, 8, 1), train={})
    L = len(tiny_denoiser.layers)
    calls = []

    def fake(engine, bank, **k):
        calls.append(1)
        return np.linspace(1, 2, L)[:, None] * np.array([1.0, 0.1, 0.0])[None], {"probes": 1, "images": 1}

    monkeypatch.setattr(sensitivity, "layer_sensitivity", fake)
    out = tmp_path / "p.json"
    args = ["profiles", "--model", str(ck), "--set", "num_steps=3", "--set", "bit_choices=[4,8,32]",
            "--set", "images_per_env=2", "--set", "quant_preset=plain", "--budget", "0.1", "--num-profiles", "3", "--out", str(out), "--json"]
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["path"] == str(out) and 1 <= s["num_profiles"] <= 3 and len(calls) == 1
    p = load_profiles(out)
    assert p.K == s["num_profiles"] and p.source == "sensitivity_ilp"
    assert main(args) == 0 and len(calls) == 1  # the second call reads the cache
    core = E.make_core(model=str(ck), num_steps=3, bit_choices=CHOICES, images_per_env=2, bank_size=4,
                       quant_preset="plain",
                       action_space="profiles", profiles=str(out))
    assert core.profiles.same_bits(p)
    assert main(["profiles", "--model", str(ck), "--set", "reward=nope", "--out", str(out)]) == 2
    assert "reward must be one of" in capsys.readouterr().err


def _toy_run_config(tmp_path, ck, pfile, lam):
    return RunConfig(name="p", agent="ppo_jax", env={
        "model": str(ck), "num_steps": 2, "images_per_env": 2, "bank_size": 8, "bit_choices": list(CHOICES),
        "action_space": "profiles", "profiles": str(pfile), "lam": lam, "quant_preset": "plain"},
        total_timesteps=16 * 2 * 30, num_envs=16, agent_kwargs={"num_steps": 2, "num_minibatches": 2, "lr": 3e-3,
                                                                 "ent_coef": 0.0, "hidden": [16]},
        eval_bank_size=4, wandb="disabled")


@pytest.mark.slow  # ~2-3 CPU-minutes: PPO compile + evaluation + export
def test_profile_run_learns_cheapest_and_evaluates(tmp_path, tiny_denoiser, pfile, capsys):
    """A PPO toy with a known best profile: with a large cost weight the cheapest profile (all 4 bits) is best at
    every step; the run records its profiles, evaluates (schedules are (S, L) bits) and exports its schedule."""
    from qpolicy.denoiser import save_checkpoint
    from qpolicy.evaluation import evaluate_run
    from qpolicy.runs import export_run, load_run, train
    from qpolicy.schedule import BitSchedule

    ck = save_checkpoint(tmp_path / "ck", module=tiny_denoiser.module, params=tiny_denoiser.params,
                         schedule=tiny_denoiser.schedule, dataset="digits", image_shape=(8, 8, 1), train={})
    run = tmp_path / "run"
    cfg = _toy_run_config(tmp_path, ck, pfile, lam=50.0)
    train(cfg, run, progress=False)
    assert load_profiles(run / PROFILES_FILE).same_bits(load_profiles(pfile))
    meta = json.loads((run / "policy" / "policy.json").read_text())["meta"]
    assert meta["action_nvec"] == [] and meta["num_choices"] == 3 and len(meta["profiles"]["profiles"]) == 3
    res = evaluate_run(run, baselines="none", progress=False, with_fd=False)
    learned = res["policies"][0]
    assert learned["mean_bits_w"] == pytest.approx(4.0)  # the cheapest profile at every step
    sched = BitSchedule.load(run / "eval" / "learned_mean_schedule.json")
    assert sched.bits_w.shape == (2, len(tiny_denoiser.layers)) and set(np.unique(sched.bits_w)) == {4}
    assert export_run(run, "csv", tmp_path / "s.csv")[0].exists()
    # deployment: K onnxruntime variants, one picked per input group and step (the policy, or a fixed plan that
    # switches every step); ORT equals qpolicy's simulation of the chosen per-group schedules
    from conftest import require

    require("onnxruntime"), require("jax2onnx")
    from qpolicy.profile_runtime import deploy_run

    dep = deploy_run(run, tmp_path / "dep", n=4)
    assert dep["groups"] == 2 and dep["choices"] == [[0, 0], [0, 0]] and dep["profile_counts"] == [4, 0, 0]
    assert all(v["layers_matching"] == v["layers"] for v in dep["variants"])
    assert dep["final_error_vs_simulation"] < 1e-4 * max(dep["final_error"], 1e-6) + 1e-8
    sw = deploy_run(run, tmp_path / "dep2", n=2, pick=lambda obs, i: (i + 1) % 3)
    assert sw["choices"] == [[1, 2]] and sw["final_error_vs_simulation"] < 1e-6
    import onnxruntime as ort

    _, act = load_run(run)
    sess = ort.InferenceSession(str(tmp_path / "dep" / "policy" / "policy.onnx"))
    obs = np.random.default_rng(0).normal(size=(1, meta["obs_size"])).astype(np.float32)
    a, bits = sess.run(None, {"obs": obs})
    assert int(a.reshape(-1)[0]) == int(np.asarray(act(obs)).reshape(-1)[0])
    np.testing.assert_array_equal(bits[0], load_profiles(pfile).bits_w[int(a.reshape(-1)[0])])
    # a changed profiles file under a trained run is refused, naming the recorded profiles
    L = len(tiny_denoiser.layers)
    _profiles(tiny_denoiser, [[8] * L, [4] * L, [32] * L]).save(pfile.parent / "p.json")
    try:
        from qpolicy.envs import registry
        registry._PROFILES.clear()
        with pytest.raises(ValueError, match="trained with other precision profiles"):
            evaluate_run(run, baselines="none", progress=False, with_fd=False)
    finally:
        mixed = np.where(np.arange(L) % 2 == 0, 4, 8)
        _profiles(tiny_denoiser, [[4] * L, mixed, [32] * L]).save(pfile)
        registry._PROFILES.clear()


def test_profile_search_is_charged_to_the_learned_policy(tmp_path):
    """A profile-mode policy starts from the ILP's work: its probes count in the policy's search_forwards (and
    seconds), as a warm start's do, so searches at equal compute get the same budget."""
    from types import SimpleNamespace

    from qpolicy.evaluation import learned_compute

    cfg = RunConfig(name="p", agent="ppo_jax", env={"images_per_env": 2}, total_timesteps=300)
    s = SimpleNamespace(run_dir=tmp_path, cfg=cfg, core=SimpleNamespace(L=5))
    assert learned_compute(s)["search_forwards"] == 600  # no train summary, no profiles: decisions x images
    (tmp_path / "train_summary.json").write_text(json.dumps({"timesteps": 300, "wall_s": 10.0}))
    (tmp_path / PROFILES_FILE).write_text(json.dumps({"search": {"forwards": 2080, "seconds": 4.0}}))
    out = learned_compute(s)
    assert out["search_forwards"] == 600 + 2080 and out["search_seconds"] == pytest.approx(14.0)
