"""Export targets loaded and applied by the real tools (ModelOpt, Qwix) and `qpolicy export` on committed runs.

Needs the ``export`` extra for the tool tests (skipped without it; failed instead under QPOLICY_REQUIRE_EXPORT=1, as
`make test-all` runs them)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from qpolicy.export import FORMATS, export
from qpolicy.runs import export_run
from qpolicy.schedule import BitSchedule

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
DIGITS_SCHEDULE = RESULTS / "cpu" / "digits16_ppo_jax_demo" / "learned_mean_schedule.json"
RUNS = sorted(p.parent for p in RESULTS.rglob("config.yaml"))


@pytest.mark.parametrize("run", RUNS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_export_run_on_every_committed_run(run, tmp_path):
    evaluated = (run / "learned_mean_schedule.json").exists() or (run / "eval" / "learned_mean_schedule.json").exists()
    if not evaluated:  # training-only runs: a clear error that says what to run
        with pytest.raises(FileNotFoundError, match="qpolicy evaluate --run"):
            export_run(run, "csv", tmp_path / "s.csv")
        return
    (csv_path,) = export_run(run, "csv", tmp_path / "s.csv")
    assert csv_path == tmp_path / "s.csv" and csv_path.read_text().startswith("step,")
    paths = export_run(run, "onnxruntime", tmp_path / "ort")
    assert paths[-1].name == "manifest.json" and all(p.parent == tmp_path / "ort" for p in paths)


def test_require_fails_instead_of_skipping_under_make_test_all(monkeypatch):
    monkeypatch.delenv("QPOLICY_REQUIRE_EXPORT", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("qpolicy_no_such_tool")
    monkeypatch.setenv("QPOLICY_REQUIRE_EXPORT", "1")
    with pytest.raises(pytest.fail.Exception, match="'qpolicy_no_such_tool' cannot be imported"):
        require("qpolicy_no_such_tool")
    assert require("json") is json
    assert "QPOLICY_REQUIRE_EXPORT=1" in (ROOT / "Makefile").read_text().split("test-all:")[1].split("\n\n")[0]


def test_export_help_says_file_or_folder(capsys):
    from qpolicy.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a FILE for json, csv, step_policy, step_policy_v2" in out and "a FOLDER for vidit, modelopt" in out
    assert "{" + ",".join(FORMATS) + "}" in out  # --format is a choice list


def _torch_tree(den_layers):
    """A torch module tree with the registry's dotted names: Conv2d / Linear of the same shapes."""
    import torch

    root = torch.nn.Module()
    for lay in den_layers:
        parts = lay.path.split("/")
        node = root
        for p in parts[:-1]:
            if not hasattr(node, p):
                node.add_module(p, torch.nn.Module())
            node = getattr(node, p)
        if lay.kind == "conv":
            kh, kw, cin, cout = lay.weight_shape
            node.add_module(parts[-1], torch.nn.Conv2d(cin, cout, (kh, kw), padding="same"))
        else:
            cin, cout = lay.weight_shape
            node.add_module(parts[-1], torch.nn.Linear(cin, cout))
    return root


@pytest.mark.slow
def test_modelopt_config_validates_and_enables_the_right_quantizers(tmp_path):
    require("modelopt.torch.quantization")
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.quantization.config import QuantizeConfig

    from qpolicy.denoiser import load_denoiser
    from qpolicy.export import read_modelopt

    den = load_denoiser("digits16")
    s = BitSchedule.load(DIGITS_SCHEDULE)
    paths = export(s, tmp_path / "mo", "modelopt")
    man = json.loads(paths[-1].read_text())
    seg = man["segments"][-1]
    cfg = read_modelopt(tmp_path / "mo" / seg["file"])
    QuantizeConfig.model_validate(cfg)  # ModelOpt's own config class
    model = _torch_tree(den.layers)
    mods = dict(model.named_modules())

    def forward_loop(m):
        for lay in den.layers:
            mod = mods[lay.path.replace("/", ".")]
            x = torch.randn(2, mod.in_channels, 8, 8) if isinstance(mod, torch.nn.Conv2d) else torch.randn(2, mod.in_features)
            mod(x)

    mtq.quantize(model, cfg, forward_loop)
    qmods = dict(model.named_modules())
    step = seg["start"]
    for l, lay in enumerate(den.layers):
        m = qmods[lay.path.replace("/", ".")]
        for q, bits in ((m.weight_quantizer, s.bits_w[step, l]), (m.input_quantizer, s.bits_a[step, l])):
            if bits == 32:
                assert not q.is_enabled
            else:
                assert q.is_enabled and q.num_bits == bits, (lay.path, bits, q)
        assert m.weight_quantizer.axis in (None, 0)


@pytest.mark.slow
def test_qwix_fake_quant_forward_runs_the_rules_and_tracks_the_simulation(tmp_path):
    qwix = require("qwix")
    import dataclasses

    import jax
    import jax.numpy as jnp

    from qpolicy.denoiser import load_denoiser
    from qpolicy.engine import make_engine, quant_config
    from qpolicy.engine import relative_error
    from qpolicy.quant import ACT_DEFAULT

    den = load_denoiser("digits16")
    s = BitSchedule.load(DIGITS_SCHEDULE)
    paths = export(s, tmp_path / "qwix", "qwix")
    man = json.loads(paths[-1].read_text())
    assert any("int5" in r["reason"] for r in man["rounding"])  # the learned schedule has 4-bit layers
    seg = man["segments"][0]
    rules = json.loads((tmp_path / "qwix" / seg["file"]).read_text())
    # the bits Qwix runs, read back from the rules (32 where no rule matches)
    names = list(s.layer_names)
    run_bits = np.full((2, s.L), 32)
    for r in rules:
        (l,) = [i for i, p in enumerate(names) if re.fullmatch(r["module_path"], p)]  # each rule: one module
        run_bits[:, l] = int(r["weight_qtype"][3:]), int(r["act_qtype"][3:])
    qm = qwix.quantize_model(den.module, qwix.QtProvider([qwix.QtRule(**r) for r in rules]))
    eng = make_engine(den, steps=s.T, qcfg=quant_config("plain", a_spec=dataclasses.replace(ACT_DEFAULT, symmetric=True),
                                                         calib_n=4))
    i = seg["start"]
    x = jax.random.normal(jax.random.key(0), (8, *den.image_shape))
    t = jnp.full((8,), s.timesteps[i], jnp.int32)
    eps_qwix = jax.jit(qm.apply)(den.variables, x, t)
    eps_sim = jax.jit(eng.eps, static_argnums=1)(x, i, jnp.asarray(run_bits[0], jnp.int32),
                                                 jnp.asarray(run_bits[1], jnp.int32))
    eps_fp = jax.jit(den.__call__)(x, t)
    q_err = float(jnp.mean(relative_error(eps_qwix, eps_fp)))
    vs_sim = float(jnp.mean(relative_error(eps_qwix, eps_sim)))
    sim_err = float(jnp.mean(relative_error(eps_sim, eps_fp)))
    print(f"eps rel. error: qwix vs FP {q_err:.3g}, simulation vs FP {sim_err:.3g}, qwix vs simulation {vs_sim:.3g}")
    # the rules take effect at the simulation's error level; Qwix's own quantizer (its scales and rounding) is not
    # qpolicy's, so the two differ by about the quantization error itself (reported, not asserted smaller)
    assert 0.2 * sim_err < q_err < 5 * sim_err and vs_sim < 3 * sim_err


@pytest.mark.slow
def test_step_policy_nearest_first_last_n_is_measured_and_validates(tmp_path):
    require("jsonschema")
    from qpolicy.denoiser import load_denoiser
    from qpolicy.diffusion import make_sampler
    from qpolicy.engine import quant_config
    from qpolicy.step_policy import export_v1, validate

    den = load_denoiser("digits16")
    bits = np.full((10, len(den.layers)), 8)
    bits[3:7, ::2] = 5  # per-layer and per-step: not a first_last_n policy
    s = BitSchedule.for_denoiser(den, make_sampler(den.schedule, "ddim", 10), bits,
                                 quantizer=quant_config("plain").quantizer_block())  # plain: no PTQ calibration
    (p,) = export_v1(s, tmp_path / "config.json", n_images=16, den=den)
    rt = json.loads(p.read_text())["quantization_config"]["runtime"]
    validate(rt["diffusion_step_policy"])
    rec = rt["qpolicy"]
    assert rec["exact"] is False and 0 <= rt["diffusion_step_policy"]["n"] <= s.T // 2
    assert rec["final_error_first_last_n"] > 0 and rec["final_error_schedule"] > 0 and rec["eval_images"] == 16
    print(f"first_last_n n={rt['diffusion_step_policy']['n']}: final error {rec['final_error_first_last_n']:.4g} "
          f"vs the schedule's {rec['final_error_schedule']:.4g}")


@pytest.mark.slow
def test_policy_network_exports_to_onnx_with_its_observation_recipe(tmp_path):
    require("jax2onnx")
    ort = require("onnxruntime")
    import jax

    from qpolicy.agents.ppo_jax import load_policy, policy_fn
    from qpolicy.step_policy import validate

    run = RESULTS / "cpu" / "digits16_ppo_jax_demo"
    paths = export_run(run, "policy_onnx", tmp_path / "pol")
    assert [p.name for p in paths] == ["policy.onnx", "observation.json", "mean_schedule.json", "config.json"]
    recipe = json.loads(paths[1].read_text())
    params, cfg, meta = load_policy(run / "policy")
    assert len(recipe["obs_names"]) == meta["obs_size"] and recipe["obs_names"][0] == "step_frac"
    obs = np.asarray(jax.random.normal(jax.random.key(1), (1, meta["obs_size"])))
    action, bits = ort.InferenceSession(str(paths[0])).run(None, {"obs": obs})
    ref = np.asarray(policy_fn(cfg, meta)(params, obs, jax.random.key(0), True))
    np.testing.assert_array_equal(action, ref)  # the deterministic policy, as qpolicy evaluate rolls it
    np.testing.assert_array_equal(bits, np.asarray(recipe["action"]["bit_choices"])[ref])
    v2 = json.loads(paths[3].read_text())["quantization_config"]["runtime"]["diffusion_step_policy"]
    validate(v2)
    assert v2["policy_network"]["onnx"] == "policy.onnx"
