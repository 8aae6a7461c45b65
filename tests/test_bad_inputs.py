"""The bad-input suite: CLI, API, env, files, caches and concurrency. Every case must fail with one clear line
that names the field (flag, file) and what is accepted -- exit status 2 for the CLI, no traceback -- and leave
nothing half-written behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from qpolicy.cli import main
from qpolicy.denoiser import save_checkpoint
from qpolicy.rundir import LOCK_FILE


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_denoiser):
    """A tiny checkpoint, a YAML run config, a run directory (JAX PPO record, evaluated), one with a schedule to
    export, a regular file, a bad YAML and a folder held by another process's lock."""
    root = tmp_path_factory.mktemp("world")
    ck = save_checkpoint(root / "tiny", module=tiny_denoiser.module, params=tiny_denoiser.params,
                         schedule=tiny_denoiser.schedule, dataset="digits", image_shape=(8, 8, 1), train={})
    env = {"model": str(ck), "num_steps": 2, "images_per_env": 1, "bank_size": 2, "bit_choices": [4, 8]}
    base = {"name": "b", "agent": "ppo_jax", "env": env, "total_timesteps": 16, "num_envs": 2,
            "agent_kwargs": {"num_steps": 4, "num_minibatches": 1}, "wandb": "disabled"}
    (root / "cfg.yaml").write_text(yaml.safe_dump(base))
    sb3 = {**base, "agent": "ppo", "agent_kwargs": {}}
    (root / "sb3.yaml").write_text(yaml.safe_dump(sb3))
    (root / "bad.yaml").write_text("agent: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "afile").write_text("x")
    (root / "bad.json").write_text("{not json")
    (root / "shape.json").write_text(json.dumps({"bits_w": [[4]], "bits_a": [[4]]}))
    from qpolicy.runs import RunConfig

    cfg = RunConfig(**base)
    run = root / "run"
    (run / "policy").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "fingerprint": cfg.fingerprint()}))
    (run / "policy" / "policy.json").write_text(json.dumps({"format": "qpolicy.ppo_jax", "version": 1, "config": {},
                                                            "meta": {"fingerprint": cfg.fingerprint()}}))
    (run / "eval").mkdir()
    (run / "eval" / "evaluation.json").write_text("{}")
    stale = root / "stale"  # policy of another config
    (stale / "policy").mkdir(parents=True)
    (stale / "config.yaml").write_text((run / "config.yaml").read_text())
    (stale / "policy" / "policy.json").write_text(json.dumps({"format": "qpolicy.ppo_jax", "version": 1,
                                                              "config": {}, "meta": {"fingerprint": "0" * 16}}))
    evaluated = root / "evaluated"  # run's config and policy, and a schedule of the tiny model
    shutil.copytree(run, evaluated)
    from qpolicy.diffusion import make_sampler
    from qpolicy.schedule import BitSchedule

    BitSchedule.for_denoiser(tiny_denoiser, make_sampler(tiny_denoiser.schedule, "ddim", 2), 8).save(
        evaluated / "learned_mean_schedule.json")
    nopol = root / "nopolicy"
    nopol.mkdir()
    (nopol / "config.yaml").write_text((run / "config.yaml").read_text())
    (nopol / "eval").mkdir()
    (nopol / "eval" / "learned_mean_schedule.json").write_text("{}")
    other = root / "otherpreset"  # a denoiser training state of another config
    other.mkdir()
    (other / "train_state.msgpack").write_bytes(b"x")
    (other / "meta.json").write_text(json.dumps({"train": {"fingerprint": "f" * 16, "preset": "small"}}))
    held = root / "held"
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom qpolicy.rundir import locked\n"
                             "with locked(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n",
                             str(held)], stdout=subprocess.PIPE, text=True)
    assert hold.stdout.readline().strip() == "held"
    yield {"root": root, "ck": str(ck), "run": str(run), "held": str(held), "pid": hold.pid}
    hold.kill()
    hold.wait()


def snapshot(d: Path) -> dict:
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != LOCK_FILE
            and "wandb" not in p.parts}


R = "{root}"
CK = "{ck}"
RUN = "{run}"
T = ["train", "--config", f"{R}/cfg.yaml", "--run-dir", f"{R}/runs/new"]
TS = ["train", "--config", f"{R}/sb3.yaml", "--run-dir", f"{R}/runs/new"]
Q = ["quantize", "--model", CK, "--preset", "plain", "--no-fd"]

# (case id, argv, regex the one-line error must match: the field and what is accepted)
CLI_CASES = [
    # usage errors (argparse): flag named, accepted values
    ("quantize-steps-0", Q + ["--steps", "0", "--w", "8", "--a", "8"], r"argument --steps: must be an integer >= 1"),
    ("quantize-n-0", Q + ["--n", "0"], r"argument --n: must be an integer >= 1"),
    ("quantize-n-negative", Q + ["--n", "-5"], r"argument --n: must be an integer >= 1"),
    ("quantize-n-expression", Q + ["--n", "2**40"], r"argument --n: must be an integer >= 1, got '2\*\*40'"),
    ("quantize-sampler", Q + ["--sampler", "euler"], r"argument --sampler: invalid choice: 'euler'"),
    ("calibrate-n-0", ["calibrate", "--model", CK, "--n", "0"], r"argument --n: must be an integer >= 1"),
    ("calibrate-buckets-0", ["calibrate", "--model", CK, "--buckets", "0"],
     r"argument --buckets: must be an integer >= 1, got '0'"),
    ("calibrate-steps-0", ["calibrate", "--model", CK, "--steps", "0"], r"argument --steps: must be an integer"),
    ("fidelity-n-0", ["fidelity", "--model", CK, "--n", "0"], r"argument --n: must be an integer >= 1"),
    ("sample-n-0", ["denoiser", "sample", "--model", CK, "--n", "0", "--out", f"{R}/g.png"],
     r"argument --n: must be an integer >= 1, got '0'"),
    ("sample-no-out", ["denoiser", "sample", "--model", CK], r"the following arguments are required: --out"),
    ("evaluate-n-0", ["evaluate", "--run", RUN, "--n", "0"], r"argument --n: must be an integer >= 1"),
    ("evaluate-permutations-0", ["evaluate", "--run", RUN, "--permutations", "0"],
     r"argument --permutations: must be an integer >= 1, got '0'"),
    ("evaluate-baselines", ["evaluate", "--run", RUN, "--baselines", "most"], r"argument --baselines: invalid ch"),
    ("export-format", ["export", "--run", RUN, "--format", "xml", "--out", f"{R}/x"],
     r"argument --format: invalid choice: 'xml' \(choose from 'json', 'csv', .*'onnxruntime', .*'policy_onnx'\)"),
    ("unknown-command", ["trian"], r"argument cmd: invalid choice: 'trian'"),
    ("train-no-config", ["train"], r"the following arguments are required: --config"),
    ("train-num-envs-text", T + ["--num-envs", "many"], r"argument --num-envs: invalid int value: 'many'"),
    # resource guards: refused before any work, naming the limit
    ("sample-n-huge", ["denoiser", "sample", "--model", CK, "--n", "1099511627776", "--out", f"{R}/g.png"],
     r"--n=1099511627776 images need about .* GiB, more than half the available memory .*use --n <= \d+"),
    ("quantize-n-huge", Q + ["--n", "10000000000", "--w", "8", "--a", "8"], r"--n=10000000000 images need about"),
    ("calibrate-n-huge", ["calibrate", "--model", CK, "--n", "100000000000"], r"--n=100000000000 images need"),
    # models and files
    ("quantize-missing-model", ["quantize", "--model", f"{R}/nope", "--w", "8", "--a", "8"],
     r"model '.*nope' is neither a checkpoint folder nor a shipped model; shipped models: \["),
    ("layers-missing-model", ["layers", "--model", "digits99"], r"model 'digits99' is neither a checkpoint folder"),
    ("quantize-no-bits", Q, r"give --w and --a \(uniform bits\), or --schedule FILE"),
    ("quantize-bits-not-a-choice", Q + ["--w", "7", "--a", "8"],
     r"--w = 7 is not an accepted bitwidth: bits 7 not in the accepted choice set \(2, 3, 4, 5, 6, 8, 16, 32\)"),
    ("quantize-schedule-missing", Q + ["--schedule", f"{R}/none.json"], r"not found: .*none.json"),
    ("quantize-schedule-bad-json", Q + ["--schedule", f"{R}/bad.json"], r"bad.json.* not valid JSON"),
    ("quantize-schedule-shape", Q + ["--schedule", f"{R}/shape.json"],
     r"shape.json: bits_w has shape 1 x 1; expected T x \d+ \(sampler steps x model layers\)"),
    ("quantize-schedule-and-bits", Q + ["--schedule", f"{R}/shape.json", "--w", "8"],
     r"give either --w/--a \(uniform bits\) or --schedule FILE, not both"),
    ("quantize-schedule-and-keep-ends", Q + ["--schedule", f"{R}/shape.json", "--keep-ends", "8"],
     r"--keep-ends applies to uniform bits \(--w/--a\), not to --schedule FILE"),
    # run configs
    ("train-missing-config", ["train", "--config", f"{R}/none.yaml"], r"config file not found: .*none.yaml"),
    ("train-bad-yaml", ["train", "--config", f"{R}/bad.yaml"], r"config .*bad.yaml is not valid YAML"),
    ("train-yaml-list", ["train", "--config", f"{R}/list.yaml"], r"must be a mapping of RunConfig fields"),
    ("train-set-bad-yaml", T + ["--set", "env.lam=["], r"--set value '\[' is not valid YAML"),
    ("train-set-no-equals", T + ["--set", "lam"], r"override 'lam' must look like key=value"),
    ("train-set-unknown-env", T + ["--set", "env.bogus=1"], r"unknown env fields \['bogus'\]; accepted: \["),
    ("train-set-unknown-field", T + ["--set", "totl_timesteps=5"], r"unknown config fields \['totl_timesteps'\]"),
    ("train-set-not-mapping", T + ["--set", "seed.x=1"], r"seed must be an integer >= 0, got .'x': 1."),
    ("train-agent", T + ["--set", "agent=dqn"], r"agent must be one of \('ppo', 'a2c', 'sac', 'ppo_jax'\)"),
    ("train-total-0", T + ["--total-timesteps", "0"], r"total_timesteps must be an integer >= 1, got 0"),
    ("train-num-envs-0", T + ["--set", "num_envs=0"], r"num_envs must be an integer >= 1"),
    ("train-seed-negative", T + ["--set", "seed=-1"], r"seed must be an integer >= 0"),
    ("train-budget-2", T + ["--set", "budget=2"], r"budget must be a number in \(0, 1\]"),
    ("train-wandb", T + ["--set", "wandb=maybe"], r"wandb must be one of \('offline', 'online', 'disabled'\)"),
    ("train-bit-choices-string", T + ["--set", "env.bit_choices='48'"], r"bit_choices must be strictly increasing"),
    ("train-bit-choices-int", T + ["--set", "env.bit_choices=48"], r"bit_choices must be strictly increasing"),
    ("train-bit-choices-order", T + ["--set", "env.bit_choices=[8,4]"], r"bit_choices must be strictly increasing"),
    ("train-bit-choices-range", T + ["--set", "env.bit_choices=[1,8]"], r"bit_choices .*in \[2, 32\]"),
    ("train-env-steps-0", T + ["--set", "env.num_steps=0"], r"num_steps must be an integer >= 1"),
    ("train-env-lam", T + ["--set", "env.lam=abc"], r"lam must be a finite number"),
    ("train-env-model", T + ["--set", f"env.model={R}/nope"], r"neither a checkpoint folder nor a shipped model"),
    ("train-bank-huge", T + ["--set", "env.bank_size=100000000000"],
     r"env.bank_size=100000000000 reference images need about .* GiB.*use env.bank_size <= \d+"),
    ("train-envs-huge", TS + ["--num-envs", "1000000000000"], r"num_envs x env.images_per_env=\d+ env images need"),
    ("train-sac-layerwise", T + ["--set", "agent=sac", "--set", "layerwise=true"], r"needs layerwise: false"),
    ("train-agent-kwargs-unknown", T + ["--set", "agent_kwargs.bogus=1"], r"unknown agent_kwargs \['bogus'\]"),
    ("train-ppo-jax-minibatches", T + ["--set", "agent_kwargs.num_minibatches=3"],
     r"num_minibatches \(3\) must divide the rollout batch num_envs \* num_steps = 8; accepted: \[1, 2, 4, 8\]"),
    ("train-ppo-jax-lr", T + ["--set", "agent_kwargs.lr=abc"], r"lr must be a finite number"),
    ("train-sb3-n-steps-0", TS + ["--set", "agent_kwargs.n_steps=0"], r"agent_kwargs.n_steps must be an integer >= 1"),
    ("train-sb3-lr-abc", TS + ["--set", "agent_kwargs.learning_rate=abc"],
     r"agent_kwargs.learning_rate must be a finite number > 0, got 'abc'"),
    ("train-sb3-gamma", TS + ["--set", "agent_kwargs.gamma=2"], r"agent_kwargs.gamma must be a finite number"),
    ("train-sb3-batch-1", TS + ["--set", "agent_kwargs.batch_size=1"], r"agent_kwargs.batch_size must be an integer"),
    ("train-run-dir-under-file", ["train", "--config", f"{R}/cfg.yaml", "--run-dir", f"{R}/afile/run"],
     r"run directory .*afile/run cannot be created: .*afile is a file"),
    ("train-run-dir-is-file", ["train", "--config", f"{R}/cfg.yaml", "--run-dir", f"{R}/afile"],
     r"afile is a file, not a directory"),
    ("train-into-other-config", ["train", "--config", f"{R}/cfg.yaml", "--run-dir", RUN, "--set", "env.lam=9"],
     r"holds a run of another config \(changed: env.lam\)"),
    # evaluation and export
    ("evaluate-missing-run", ["evaluate", "--run", f"{R}/none"], r"run directory not found: .*none"),
    ("evaluate-budget-2", ["evaluate", "--run", RUN, "--budget", "2"], r"budget must be a finite number > 0 and <= 1"),
    ("evaluate-budget-0", ["evaluate", "--run", RUN, "--budget", "0"], r"budget must be a finite number > 0"),
    ("evaluate-budget-nan", ["evaluate", "--run", RUN, "--budget", "nan"], r"budget must be a finite number"),
    ("evaluate-eval-seed-train", ["evaluate", "--run", RUN, "--eval-seed", "1000", "--force"],
     r"eval seed 1000 is the train bank's noise stream"),
    ("evaluate-overwrite", ["evaluate", "--run", RUN], r"already has an evaluation .*pass --force to overwrite"),
    ("evaluate-stale-policy", ["evaluate", "--run", f"{R}/stale"], r"made under another config"),
    ("export-stale-policy", ["export", "--run", f"{R}/stale", "--out", f"{R}/x.json"],
     r"the policy in .*stale was made under another config \(fingerprint 0{{16}}, config [0-9a-f]{{16}}\).* retrain "
     r"into a new run directory or restore the config it was trained with"),
    ("export-no-policy", ["export", "--run", f"{R}/nopolicy", "--out", f"{R}/x.json"], r"no trained policy in"),
    ("export-no-eval", ["export", "--run", RUN, "--out", f"{R}/x.json"], r"holds no learned_mean_schedule.json .*run `qpolicy evaluate"),
    ("report-missing", ["report", f"{R}/none", "--out", f"{R}/rep"],
     r"run directory not found: .*none; accepted: a run directory \(with config.yaml\) or a folder of them"),
    ("export-out-under-file", ["export", "--run", f"{R}/evaluated", "--format", "onnxruntime", "--out",
                               f"{R}/afile/x"], r"export --out .*afile/x cannot be created: .*afile is a file"),
    ("export-out-is-file", ["export", "--run", f"{R}/evaluated", "--format", "onnxruntime", "--out", f"{R}/afile"],
     r"--out .*afile is a file, but format 'onnxruntime' writes several files: give a folder"),
    ("export-out-unwritable-file", ["export", "--run", f"{R}/evaluated", "--format", "csv", "--out", "/proc/x"],
     r"export --out /proc/x cannot be written: "),
    ("export-out-unwritable-folder", ["export", "--run", f"{R}/evaluated", "--format", "onnxruntime", "--out",
                                      "/proc/x"], r"export --out /proc/x cannot be written: "),
    # denoiser training: refused before any work
    ("denoiser-out-under-file", ["denoiser", "train", "--data", "digits", "--preset", "tiny", "--steps", "1",
                                 "--out", f"{R}/afile/den"], r"out .*afile/den cannot be created: .*is a file"),
    ("denoiser-preset", ["denoiser", "train", "--data", "digits", "--preset", "huge", "--steps", "1", "--out",
                         f"{R}/den"], r"preset must be one of \("),
    ("denoiser-steps-0", ["denoiser", "train", "--data", "digits", "--preset", "tiny", "--steps", "0", "--out",
                          f"{R}/den"], r"steps must be an integer >= 1"),
    ("denoiser-lr", ["denoiser", "train", "--data", "digits", "--preset", "tiny", "--steps", "1", "--lr", "-1",
                     "--out", f"{R}/den"], r"lr must be a finite number > 0"),
    ("denoiser-data", ["denoiser", "train", "--data", "mnist", "--preset", "tiny", "--steps", "1", "--out",
                       f"{R}/den"], r"unknown dataset name 'mnist'; accepted names: 'digits', 'faces', 'patches', "
                                    r"'npz:"),
    ("denoiser-resume-other-preset", ["denoiser", "train", "--data", "digits", "--preset", "tiny", "--steps", "1",
                                      "--out", f"{R}/otherpreset"],
     r"holds a training run of another config .*changed: preset"),
    ("sample-out-under-file", ["denoiser", "sample", "--model", CK, "--n", "2", "--out", f"{R}/afile/g.png"],
     r"--out .*afile/g.png cannot be created: .*afile is a file"),
    # concurrency
    ("train-locked", ["train", "--config", f"{R}/cfg.yaml", "--run-dir", "{held}"],
     r"run directory .*held is in use by pid {pid} on "),
    ("export-locked", ["export", "--run", f"{R}/evaluated", "--format", "onnxruntime", "--out", "{held}"],
     r"export --out folder .*held is in use by pid {pid} on "),
    ("deploy-locked", ["deploy", "onnx", "--schedule", f"{R}/evaluated/learned_mean_schedule.json", "--model", CK,
                       "--out", "{held}"], r"deploy --out folder .*held is in use by pid {pid} on "),
]


@pytest.mark.parametrize("case, argv, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(world, capsys, monkeypatch, case, argv, pattern):
    monkeypatch.chdir(world["root"])
    argv = [a.format(**world) for a in argv]
    before = snapshot(world["root"])
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert __import__("re").search(pattern.format(**world), err), err
    assert snapshot(world["root"]) == before  # nothing written, nothing half-written
    assert not list(world["root"].rglob("*.tmp")) and not (world["root"] / "runs").exists()


def test_every_flag_has_help():
    import argparse

    from qpolicy.cli import build_parser

    def bare(p, name):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                yield from (x for k, sp in a.choices.items() for x in bare(sp, f"{name} {k}"))
            elif a.option_strings and not a.help:
                yield f"{name} {a.option_strings[-1]}"

    assert list(bare(build_parser(), "qpolicy")) == []


def test_debug_shows_the_traceback(world):
    with pytest.raises(ValueError, match="budget"):
        main(["--debug", "evaluate", "--run", world["run"], "--budget", "2"])


# ----------------------------------------------------------------------------------------------- API
def _api_cases():
    from qpolicy.agents.ppo_jax import PPOConfig
    from qpolicy.banks import check_eval_seed
    from qpolicy.config import check_memory
    from qpolicy.engine import QuantConfig
    from qpolicy.envs import EnvConfig
    from qpolicy.runs import RunConfig
    from qpolicy.train import TrainConfig

    return [
        ("env-bit-choices-str", lambda: EnvConfig(bit_choices="48"), r"bit_choices must be strictly increasing"),
        ("env-bit-choices-int", lambda: EnvConfig(bit_choices=48), r"bit_choices must be strictly increasing"),
        ("env-bit-choices-dup", lambda: EnvConfig(bit_choices=(4, 4, 8)), r"bit_choices must be strictly incr"),
        ("env-bit-choices-float", lambda: EnvConfig(bit_choices=(4.5, 8)), r"bit_choices must be strictly incr"),
        ("run-budget", lambda: RunConfig(budget=2.0), r"budget must be a number in \(0, 1\]"),
        ("run-env-not-mapping", lambda: RunConfig(env=[1]), r"env must be a mapping"),
        ("ppo-minibatches", lambda: PPOConfig(num_minibatches=0), r"num_minibatches"),
        ("eval-seed", lambda: check_eval_seed(3000), r"eval seed 3000 is the calib bank's"),
        ("train-ema", lambda: TrainConfig(data="digits", preset="tiny", steps=1, out="x", ema_decay=1.0),
         r"ema_decay must be a finite number >= 0 and < 1"),
        ("quant-act-ranges", lambda: QuantConfig(act_ranges="fixed"), r"act_ranges must be one of"),
        ("memory", lambda: check_memory("--n", 2**50, 4096), r"--n=\d+ images need about"),
        ("memory-type", lambda: check_memory("--n", "10", 4), r"--n must be an integer >= 1"),
    ]


@pytest.mark.parametrize("i", range(12))
def test_api_bad_input(i):
    case, fn, pattern = _api_cases()[i]
    with pytest.raises(ValueError, match=pattern) as e:
        fn()
    assert "\n" not in str(e.value), case


# ----------------------------------------------------------------------------------------------- env
@pytest.fixture(scope="module")
def env(world):
    from qpolicy.envs.gym_env import QuantDiffusionEnv

    return QuantDiffusionEnv(model=world["ck"], num_steps=2, images_per_env=1, bank_size=2, bit_choices=(4, 8),
                             quant_preset="plain")


def test_env_refuses_step_after_termination_and_before_reset(world):
    from qpolicy.envs.gym_env import QuantDiffusionEnv

    e = QuantDiffusionEnv(model=world["ck"], num_steps=2, images_per_env=1, bank_size=2, bit_choices=(4, 8),
                          quant_preset="plain", render_mode="rgb_array")
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        e.step(e.action_space.sample())
    e.reset(seed=0)
    assert e.render().dtype == np.uint8 and e.render().shape == (8, 8, 3)
    term = False
    for _ in range(2):
        _, _, term, _, _ = e.step(e.action_space.sample())
    assert term
    with pytest.raises(RuntimeError, match=r"episode has ended .*call reset\(\) before step\(\)"):
        e.step(e.action_space.sample())
    e.reset()
    e.step(e.action_space.sample())  # a reset starts a new episode
    with pytest.raises(ValueError, match="render_mode must be None or 'rgb_array', got 'human'"):
        QuantDiffusionEnv(model=world["ck"], render_mode="human")


# ----------------------------------------------------------------------------------------------- files
def test_corrupt_and_non_finite_checkpoints_are_named(world, tmp_path, tiny_denoiser):
    import jax

    from qpolicy.denoiser import load_denoiser

    bad = tmp_path / "nan"
    params = jax.tree_util.tree_map(np.array, tiny_denoiser.params)  # writable copies
    k = next(iter(params))
    leaf = jax.tree_util.tree_leaves(params[k])[0]
    leaf.reshape(-1)[0] = np.nan
    save_checkpoint(bad, module=tiny_denoiser.module, params=params, schedule=tiny_denoiser.schedule,
                    dataset="digits", image_shape=(8, 8, 1), train={})
    with pytest.raises(ValueError, match=r"nan/weights.msgpack holds NaN or inf in 1 tensor\(s\), first .*finite"):
        load_denoiser(bad)
    (bad / "weights.msgpack").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=r"weights.msgpack is corrupt"):
        load_denoiser(bad)
    (bad / "meta.json").write_text("{")
    with pytest.raises(ValueError, match=r"meta.json is not valid JSON"):
        load_denoiser(bad)


def test_json_never_holds_bare_nan(tmp_path):
    from qpolicy.io import atomic_write_json, dumps

    atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan")})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text) == {"a": None, "b": [None, 1.5],
                                                                                  "c": None}
    assert dumps({"x": np.float64(2.0)}) == '{"x": 2.0}'


def test_schedule_quantizer_block_is_applied_or_refused(world, tmp_path, capsys):
    from qpolicy.denoiser import load_denoiser
    from qpolicy.engine import QuantConfig, quant_config
    from qpolicy.quant import QuantSpec
    from qpolicy.schedule import BitSchedule

    den = load_denoiser(world["ck"])
    from qpolicy.diffusion import make_sampler

    smp = make_sampler(den.schedule, "ddim", 2)
    L = len(den.layers)
    q = quant_config("plain", w_spec=QuantSpec(symmetric=False, granularity="tensor"))
    s = BitSchedule.for_denoiser(den, smp.to_dict(), np.full((2, L), 8), np.full((2, L), 8),
                                 quantizer=q.quantizer_block())
    f = tmp_path / "s.json"
    s.save(f)
    # a flag contradicting the block is refused
    assert main(["quantize", "--model", world["ck"], "--schedule", str(f), "--preset", "ptq", "--no-fd"]) == 2
    assert "--preset ptq contradicts the schedule's quantizer block (plain)" in capsys.readouterr().err
    # without flags, the block is applied (asymmetric per-tensor weights, plain preset)
    from qpolicy.engine import quant_config_from_block

    got = quant_config_from_block(s.quantizer, bit_choices=s.bit_choices)
    assert isinstance(got, QuantConfig) and got.w_spec == q.w_spec and got.preset == "plain" == q.preset


# ----------------------------------------------------------------------------------------------- caches
def test_bad_cache_files_are_named_removed_and_recomputed(world, tmp_path):
    from qpolicy import banks
    from qpolicy.denoiser import load_denoiser
    from qpolicy.engine import make_engine, quant_config

    eng = make_engine(load_denoiser(world["ck"]), steps=2, qcfg=quant_config("plain"))
    banks.clear_memory_cache()  # this test's own disk cache (QPOLICY_CACHE) must be written
    good = np.asarray(banks.reference_bank(eng, "train", 2).traj)
    path = next((banks.cache_dir() / "refs").glob("*train2*.npy"))
    other = np.asarray(banks.reference_bank(eng, "eval", 2).traj)
    opath = next((banks.cache_dir() / "refs").glob("*eval2*.npy"))

    def reload(expect_warning: str):
        banks.clear_memory_cache()
        with pytest.warns(UserWarning, match=expect_warning):
            traj = np.asarray(banks.reference_bank(eng, "train", 2).traj)
        assert np.array_equal(traj, good) and path.exists()  # recomputed and rewritten

    raw = path.read_bytes()
    path.write_bytes(raw[:100] + b"\x00" * (len(raw) - 100))  # zeroed
    reload(rf"cache file .*{path.name} is invalid: its checksum does not match")
    path.write_bytes(path.read_bytes()[:50])  # truncated
    reload(rf"{path.name} is invalid: its checksum does not match")
    path.write_bytes(opath.read_bytes())  # another bank's array and sidecar
    Path(str(path) + ".json").write_text(Path(str(opath) + ".json").read_text())
    reload(r"is invalid: it was made for '.*eval2.*', not '.*train2")
    Path(str(path) + ".json").unlink()  # no sidecar
    reload(r"its sidecar .*\.json is missing")
    banks.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good file loads silently
        assert np.array_equal(np.asarray(banks.reference_bank(eng, "train", 2).traj), good)
    assert not np.array_equal(other, good)


def test_stale_temp_files_of_dead_writers_are_cleaned(tmp_path):
    from qpolicy.io import clean_stale_temps, write_cache

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".bank.npy.{dead}.abc123.tmp"
    live = tmp_path / f".bank.npy.{os.getpid()}.def456.tmp"
    old = tmp_path / ".x.npy.zz.tmp"
    for f in (stale, live, old):
        f.write_bytes(b"partial")
    os.utime(old, (0, 0))
    write_cache(tmp_path / "bank.npy", b"data", key="k")
    assert not stale.exists() and live.exists() and not old.exists()
    assert clean_stale_temps(tmp_path) == []
