"""The measured latency cost (qpolicy.latency, env.cost = "latency"): table shape, int8 parity, the env's costs,
bad inputs, the run fingerprint of committed runs, and a train run end to end on a tiny checkpoint."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax import lax

import qpolicy.envs as E
from qpolicy import latency
from qpolicy.agents.budget import budget_repair, schedule_cost
from qpolicy.denoiser import save_checkpoint
from qpolicy.latency import capture_ops, expand, kernel_class, load_for, measure, save_table
from qpolicy.runs import RunConfig

ROOT = Path(__file__).resolve().parent.parent
CHOICES = (4, 8, 16, 32)


@pytest.fixture(scope="module")
def record(tiny_denoiser):
    """A real measurement of the tiny model (batch 2, one timed call per kernel): every layer, every class."""
    return measure(tiny_denoiser, batch=2, warmup=1, repeats=1, bit_choices=CHOICES)


def synthetic(den, class_seconds):
    """A table record with chosen per-class seconds (exact expected costs), in the file format."""
    sec = np.asarray(class_seconds, np.float64)
    return {"format": latency.FORMAT, "version": latency.VERSION, "model": den.name, "layer_hash": den.layer_hash,
            "layers": [l.path for l in den.layers], "bit_choices": list(CHOICES), "batch": 1,
            "class_seconds": sec.tolist(), "table": expand(sec, CHOICES).tolist()}


def test_kernel_class_rule():
    assert kernel_class(4, 8) == "int8" and kernel_class(2, 2) == "int8"  # no int4 kernel: W4A8 runs int8
    assert kernel_class(8, 16) == "bf16" and kernel_class(16, 16) == "bf16"
    assert kernel_class(16, 32) == "fp32" and kernel_class(32, 4) == "fp32"
    t = expand(np.array([[1.0, 2.0, 3.0]]), CHOICES)
    np.testing.assert_array_equal(t[0], [[1, 1, 2, 3], [1, 1, 2, 3], [2, 2, 2, 3], [3, 3, 3, 3]])


def test_table_shape_and_positive(record, tiny_denoiser):
    L = len(tiny_denoiser.layers)
    tab = np.asarray(record["table"])
    assert tab.shape == (L, len(CHOICES), len(CHOICES)) and np.all(tab > 0) and np.isfinite(tab).all()
    np.testing.assert_array_equal(tab, expand(np.asarray(record["class_seconds"]), CHOICES))
    assert record["layer_hash"] == tiny_denoiser.layer_hash and record["device"]["platform"] == jax.default_backend()
    assert record["fallback_layers"] == []  # conv / dense only: every layer ran its own lax op


def test_captured_ops_are_the_layers_own(tiny_denoiser):
    calls = capture_ops(tiny_denoiser, 3)
    for lay, cs in zip(tiny_denoiser.layers, calls):
        assert cs and sum(1 for _ in cs) == lay.calls
        for c in cs:
            assert c.lhs[0] == 3 and c.rhs == lay.weight_shape  # batch first; the layer's own kernel
            assert c.op == ("conv" if lay.kind == "conv" else "dot")


@pytest.mark.parametrize("kind", ["conv", "dot"])
def test_int8_kernel_matches_float_reference(tiny_denoiser, kind):
    """The timed int8 kernel (int8 operands, int32 accumulation) = the float conv / dot of the same integer codes."""
    calls = [c for cs in capture_ops(tiny_denoiser, 2) for c in cs if c.op == kind]
    call = max(calls, key=lambda c: int(np.prod(c.rhs)))  # the widest contraction
    fn, (a, b) = latency._kernel(call, "int8", np.random.default_rng(0))
    assert a.dtype == jnp.int8 and b.dtype == jnp.int8
    got = np.asarray(fn(a, b))
    assert got.dtype == np.int32
    op = lax.conv_general_dilated if kind == "conv" else lax.dot_general
    ref = op(a.astype(jnp.float32), b.astype(jnp.float32), *call.args, precision=lax.Precision.HIGHEST,
             **{k: v for k, v in call.kwargs.items() if k != "precision"})
    assert np.abs(got).max() > 127  # a real accumulation, beyond int8
    np.testing.assert_array_equal(got, np.asarray(ref).astype(np.int64))  # exact: sums of integers < 2**24


def test_env_costs_are_the_tables_relative_entries(tmp_path, tiny_denoiser):
    den = tiny_denoiser
    L = len(den.layers)
    rng = np.random.default_rng(0)
    sec = rng.uniform(1, 2, (L, 3)) * np.array([0.5, 1.5, 1.0])  # bf16 slower than fp32, as on a CPU
    path = save_table(synthetic(den, sec), tmp_path / "lat.json")
    kw = dict(model=den, num_steps=2, bank_size=4, images_per_env=2, bit_choices=CHOICES, quant_preset="plain")
    core = E.make_core(cost="latency", latency_table=str(path), **kw)
    tab = expand(sec, CHOICES)
    rel = tab / tab[:, -1, -1].sum()
    np.testing.assert_allclose(np.asarray(core.default_params.cost_table), rel, rtol=1e-6)
    assert core.engine.latency is not None and E.make_core(**kw).engine.latency is None  # BOPs env unchanged
    _, state = core.jit_reset(jax.random.key(0), core.default_params)
    iw = rng.integers(0, len(CHOICES), L)
    _, state, _, _, _, info = core.jit_step_env(jax.random.key(1), state, jnp.asarray(iw, jnp.int32),
                                                core.default_params)
    np.testing.assert_allclose(float(info["step_cost"]), rel[np.arange(L), iw, iw].sum() / 2, rtol=1e-5)
    # summaries and budgets price by the same table
    bits = np.asarray(CHOICES)[np.stack([iw, iw])]
    s = core.engine.cost_model().summary(bits, bits)
    assert s["cost_rel_fp32"] == pytest.approx(rel[np.arange(L), iw, iw].sum()) == s["latency_rel_fp32"]
    assert schedule_cost(core.engine, bits, bits) == pytest.approx(s["cost_rel_fp32"])
    # a repair from FP32 meets a latency budget although 32 -> 16 costs more (it skips to the int8 class)
    budget = 0.7
    bw, ba = budget_repair(core.engine, np.full((2, L), 32), np.full((2, L), 32), budget)
    assert schedule_cost(core.engine, bw, ba) <= budget * (1 + 1e-9) and not (bw == 16).all()


def test_bad_tables_give_clear_errors(tmp_path, tiny_denoiser, record):
    den = tiny_denoiser
    with pytest.raises(FileNotFoundError, match=r"latency table .*nope\.json not found.*qpolicy latency"):
        load_for(den, CHOICES, tmp_path / "nope.json")
    bad = dict(record, table=np.ones((2, 4, 4)).tolist())
    with pytest.raises(ValueError, match=r"bad\.json: field 'table' has shape \(2, 4, 4\), expected"):
        load_for(den, CHOICES, save_table(bad, tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"field 'bit_choices' is \[4, 8, 16, 32\], which lacks bits \[2, 6\]"):
        load_for(den, (2, 6, 8, 32), save_table(record, tmp_path / "ok.json"))
    with pytest.raises(ValueError, match=r"field 'layer_hash' is 'deadbeef'"):
        load_for(den, CHOICES, save_table(dict(record, layer_hash="deadbeef"), tmp_path / "h.json"))
    with pytest.raises(ValueError, match="field 'table' must hold finite positive"):
        load_for(den, CHOICES, save_table(dict(record, table=(-np.asarray(record["table"])).tolist()),
                                          tmp_path / "neg.json"))
    sub = load_for(den, (8, 32), tmp_path / "ok.json")  # a subset of the measured choice set: sliced
    np.testing.assert_array_equal(sub, np.asarray(record["table"])[:, [1, 3]][:, :, [1, 3]])
    with pytest.raises(ValueError, match=r"cost must be one of \('bops', 'latency'\)"):
        E.EnvConfig(cost="joules")
    with pytest.raises(ValueError, match=r"cost 'latency' needs 32 in bit_choices"):
        E.EnvConfig(cost="latency", bit_choices=(4, 8))
    with pytest.raises(ValueError, match="latency_table applies to cost 'latency' only"):
        E.EnvConfig(latency_table="x.json")
    with pytest.raises(ValueError, match="measure.* --batch|batch must be an integer"):
        measure(den, batch=0)


def test_committed_run_fingerprints_unchanged():
    """Fields added to EnvConfig after fingerprint v1 (cost, latency_table) enter the fingerprint only when set, so
    the committed runs' policies still match their configs (values computed before the fields existed)."""
    pinned = {"cpu/digits16_ppo_jax_demo": "ac0d367c36071cdc", "h100/digits16_ppo_jax_gpu": "3b734226c5501f81",
              "h100/patches32_ppo_jax": "91d2f5e0d6684111", "h100/seeds/runs_digits16/seed0": "531c1b7b86783574"}
    for run, fp in pinned.items():
        d = yaml.safe_load((ROOT / "experiments" / "results" / run / "config.yaml").read_text())
        d.pop("fingerprint", None)
        assert RunConfig(**d).fingerprint() == fp, run
        d["env"] = {**d["env"], "cost": "bops"}  # the default, written out: same run
        assert RunConfig(**d).fingerprint() == fp
        d["env"] = {**d["env"], "bit_choices": [4, 8, 32]}  # latency costs need 32 in the choice set
        bops = RunConfig(**d).fingerprint()
        d["env"] = {**d["env"], "cost": "latency"}
        assert RunConfig(**d).fingerprint() != bops


@pytest.fixture()
def lat_run(tmp_path, tiny_denoiser, capsys):
    """A tiny checkpoint, a run config, and the `qpolicy train --set env.cost=latency` command line."""
    ck = save_checkpoint(tmp_path / "ck", module=tiny_denoiser.module, params=tiny_denoiser.params,
                         schedule=tiny_denoiser.schedule, dataset="digits", image_shape=(8, 8, 1), train={})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "lat", "agent": "ppo_jax", "total_timesteps": 48, "num_envs": 4,
                                   "eval_bank_size": 4, "wandb": "disabled",
                                   "env": {"model": str(ck), "num_steps": 2, "images_per_env": 2, "bank_size": 4,
                                           "bit_choices": list(CHOICES), "quant_preset": "plain"},
                                   "agent_kwargs": {"num_steps": 6, "num_minibatches": 2}}))
    return ck, ["train", "--config", str(cfg), "--set", "env.cost=latency", "--run-dir", str(tmp_path / "run")]


def _measure_cli(ck, capsys):
    from qpolicy.cli import main

    assert main(["latency", "--model", str(ck), "--batch", "2", "--repeats", "1", "--bit-choices", "4,8,16,32",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_stores_the_table_with_the_model(lat_run, capsys):
    """`qpolicy train` with cost latency is refused before writing anything while the model has no table; `qpolicy
    latency` stores one next to the checkpoint, after which the run validates."""
    from qpolicy.cli import main
    from qpolicy.runs import load_config, validate

    ck, run = lat_run
    assert main(run) == 2
    assert "qpolicy latency" in capsys.readouterr().err and not Path(run[-1]).exists()
    out = _measure_cli(ck, capsys)
    assert Path(out["path"]) == ck / "latency" / f"{latency.device_slug()}.json"
    assert -1 <= out["comparison"]["spearman_entries"] <= 1 and "W8A8" in out["comparison"]["uniform"]
    assert out["device"]["platform"] == jax.default_backend() and out["batch"] == 2
    validate(load_config(run[2], [run[4]]))


@pytest.mark.slow  # ~3 CPU-minutes on a loaded 2-core machine (PPO compile + evaluation)
def test_train_with_latency_cost_end_to_end(lat_run, capsys):
    from qpolicy.cli import main
    from qpolicy.evaluation import evaluate_run

    ck, run = lat_run
    _measure_cli(ck, capsys)
    assert main(run) == 0
    assert yaml.safe_load((Path(run[-1]) / "config.yaml").read_text())["env"]["cost"] == "latency"
    res = evaluate_run(Path(run[-1]), baselines="none", progress=False, with_fd=False)
    learned = res["policies"][0]
    assert learned["cost_rel_fp32"] == pytest.approx(learned["latency_rel_fp32"])
