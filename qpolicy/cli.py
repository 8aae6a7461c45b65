"""The ``qpolicy`` command line. Thin: parse arguments, call the library, print or write results."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli_models import (cmd_calibrate, cmd_denoiser_eval, cmd_denoiser_sample, cmd_denoiser_train, cmd_fidelity,
                         cmd_latency, cmd_layers, cmd_profiles, cmd_quantize)
from .cli_runs import (cmd_demo, cmd_deploy_onnx, cmd_evaluate, cmd_export, cmd_report, cmd_sweep, cmd_train,
                       summary_lines)  # noqa: F401 - summary_lines: re-exported (qpolicy.cli.summary_lines)
from .config import add_config_args, check

os.environ.setdefault("WANDB_MODE", "offline")


def _int_at_least(lo: int):
    """argparse type: an integer >= lo (argparse turns the error into a usage line, exit 2)."""
    def conv(text: str) -> int:
        try:
            return check("value", int(text), kind="int", lo=lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
    conv.__name__ = f"integer >= {lo}"
    return conv


def run_args(parser: argparse.ArgumentParser) -> None:
    """RunConfig's scalar fields as flags (override the YAML config; env.* and agent_kwargs.* go through --set)."""
    from .runs import RunConfig

    add_config_args(parser, RunConfig, exclude=("env", "agent_kwargs"))


def build_parser() -> argparse.ArgumentParser:
    from .export import DIR_FORMATS, FILE_FORMATS, FORMATS

    p = _Parser(prog="qpolicy", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)

    den = sub.add_parser("denoiser", help="train, sample and evaluate denoisers").add_subparsers(dest="sub",
                                                                                                 required=True)
    t = den.add_parser("train", help="train a U-Net denoiser (resumes if OUT holds a training state)")
    from .train import TrainConfig

    add_config_args(t, TrainConfig, required=("data", "preset", "steps", "out"),
                    flags={"ema_decay": "--ema", "time_limit_s": "--time-limit"},
                    defaults={"wandb": os.environ.get("WANDB_MODE", "offline")})
    t.set_defaults(fn=cmd_denoiser_train)

    def sampling_args(q, n_default):
        q.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
        q.add_argument("--n", type=_int_at_least(1), default=n_default, help="images to sample")
        q.add_argument("--steps", type=_int_at_least(1), default=20, help="sampler steps")
        q.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="sampler")
        q.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
        q.add_argument("--seed", type=_int_at_least(0), default=0, help="noise seed")

    s = den.add_parser("sample", help="write a sample grid PNG")
    sampling_args(s, 64)
    s.add_argument("--out", required=True, help="PNG file of the sample grid")
    s.set_defaults(fn=cmd_denoiser_sample)
    e = den.add_parser("eval", help="Fréchet distance of samples in the dataset's feature space")
    sampling_args(e, 1000)
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(fn=cmd_denoiser_eval)

    l = sub.add_parser("layers", help="list the quantizable layers (the action order)")
    l.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
    l.add_argument("--json", action="store_true", help="print JSON")
    l.set_defaults(fn=cmd_layers)

    from .engine import DEFAULT_PRESET, QUANT_PRESETS

    def engine_args(q, n_default):
        q.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
        q.add_argument("--w", type=int, default=None, help="weight bits for every layer and step")
        q.add_argument("--a", type=int, default=None, help="activation bits for every layer and step")
        q.add_argument("--schedule", default=None,
                       help="JSON schedule file (full BitSchedule or bits_w/bits_a T x L) instead of --w/--a")
        q.add_argument("--n", type=_int_at_least(1), default=n_default, help=f"images (default: {n_default})")
        q.add_argument("--steps", type=_int_at_least(1), default=10,
                       help="sampler steps (default: 10; ignored with --schedule)")
        q.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="sampler (default: ddim)")
        q.add_argument("--act-ranges", default=None, choices=("dynamic", "static"),
                       help="activation ranges (default: dynamic, or the schedule's)")
        q.add_argument("--preset", default=None, choices=tuple(QUANT_PRESETS),
                       help=f"quantizer preset (default: {DEFAULT_PRESET}, or the schedule's quantizer block; ptq: "
                            "shortcut splitting, bias correction, weight clipping search; plain: none of them; "
                            "ptq-smooth: ptq + SmoothQuant at weight bits >= 8; ptq-recon: ptq + AdaRound; "
                            "ptq-gptq: ptq + GPTQ; full: ptq + SmoothQuant + AdaRound)")
        q.add_argument("--keep-ends", type=int, default=None, metavar="B",
                       help="with --w/--a: the first and last layers (those reading or writing the image) at >= B "
                            "bits, the PTQ convention (e.g. 8 under W4A8)")
        q.add_argument("--bank", default="eval", choices=("eval", "train"), help="noise bank (default: eval)")
        q.add_argument("--json", action="store_true", help="print JSON")

    q = sub.add_parser("quantize", help="run the quantized sampler under uniform bits or a schedule file")
    engine_args(q, 256)
    q.add_argument("--no-fd", action="store_true", help="skip the feature-space Fréchet distance")
    q.set_defaults(fn=cmd_quantize)

    fi = sub.add_parser("fidelity", help="integer execution (int8 operands, int32 accumulation) vs the simulation, "
                                         "layer by layer and end to end")
    engine_args(fi, 4)
    fi.set_defaults(fn=cmd_fidelity)

    tr = sub.add_parser("train", help="launch (or resume) a precision-policy training run")
    tr.add_argument("--config", required=True, help="YAML run config (experiments/configs/*.yaml)")
    tr.add_argument("--set", action="append", help="override a field: key=value (dotted, e.g. env.lam=2)")
    tr.add_argument("--run-dir", default=None, help="run directory (default runs/<name>)")
    tr.add_argument("--seeds", default=None, help="train once per seed, e.g. 0,1,2, into RUN_DIR/seed<s>")
    run_args(tr)
    tr.set_defaults(fn=cmd_train)

    sw = sub.add_parser("sweep", help="a grid of run configs x seeds on Ray Tune (local, or a cluster with --address)")
    sw.add_argument("--config", required=True, help="YAML run config")
    sw.add_argument("--grid", action="append", help="key=v1,v2,... (dotted; repeat for a product), e.g. env.lam=1,2,4")
    sw.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2")
    sw.add_argument("--set", action="append", help="override a field of every trial: key=value")
    sw.add_argument("--out", required=True, help="sweep folder (trials are run directories inside it)")
    sw.add_argument("--address", default=None, help="Ray cluster address (default: a private local Ray)")
    sw.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    sw.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (fractions share a card)")
    sw.add_argument("--no-evaluate", action="store_true", help="train only")
    sw.add_argument("--baselines", default="fast", choices=("all", "fast", "none"), help="evaluation baselines")
    sw.add_argument("--n", type=int, default=None, help="eval images (default from the run config)")
    sw.add_argument("--no-fd", action="store_true", help="skip Fréchet distances in the evaluation")
    sw.add_argument("--json", action="store_true", help="print JSON")
    sw.set_defaults(fn=cmd_sweep)

    rp = sub.add_parser("report", help="Markdown report + Pareto front with CI bars over evaluated runs and seeds")
    rp.add_argument("runs", nargs="+", help="run directories or folders of them")
    rp.add_argument("--out", required=True, help="report folder")
    rp.add_argument("--skip-unevaluated", action="store_true",
                    help="list runs without an evaluation instead of failing")
    rp.set_defaults(fn=cmd_report)

    ev = sub.add_parser("evaluate", help="evaluate a run's policy against the non-RL baselines")
    ev.add_argument("--run", required=True, help="run directory, or a folder of run directories (seeds, a sweep)")
    ev.add_argument("--baselines", default="all", choices=("all", "fast", "none"),
                    help="all | fast (no per-(layer, step) search) | none")
    ev.add_argument("--no-fd", action="store_true", help="skip the feature-space Fréchet distances")
    ev.add_argument("--budget", type=float, default=None,
                    help="baselines' BOPs budget, in (0, 1] (a fraction of FP32 BOPs; default: the learned cost)")
    ev.add_argument("--n", type=_int_at_least(1), default=None, help="eval-bank images (default from the run config)")
    ev.add_argument("--eval-seed", type=int, default=None,
                    help="noise seed of the eval images (default 2000, the eval bank; never 1000/3000: train/calib)")
    ev.add_argument("--permutations", type=_int_at_least(1), default=4,
                    help="derangements K in the permutation test")
    ev.add_argument("--search-budget", default="equal", choices=("equal", "free"),
                    help="equal: each search scores at most the schedules the learned run's training forwards pay "
                         "for; free: the searches' own defaults")
    ev.add_argument("--force", action="store_true", help="overwrite the run's existing evaluation (eval/)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(fn=cmd_evaluate)

    ex = sub.add_parser("export", help="export a run's bit schedule (its learned_mean_schedule.json)")
    ex.add_argument("--run", required=True, help="an evaluated run directory")
    ex.add_argument("--format", default="json", choices=FORMATS,
                    help=f"output format; single file: {', '.join(FILE_FORMATS)}; a folder of files: "
                         f"{', '.join(DIR_FORMATS)}")
    ex.add_argument("--out", required=True,
                    help=f"a FILE for {', '.join(FILE_FORMATS)} (an existing folder gets a default file name); "
                         f"a FOLDER for {', '.join(DIR_FORMATS)} (created; per-segment files + manifest.json)")
    ex.set_defaults(fn=cmd_export)

    dp = sub.add_parser("deploy", help="run a bit schedule in a real runtime").add_subparsers(dest="sub",
                                                                                             required=True)
    do = dp.add_parser("onnx", help="onnxruntime: one QDQ model per schedule segment, switched per sampler step; "
                                    "reports its error vs the FP sampler and vs qpolicy's simulation")
    do.add_argument("--schedule", default=None, help="a BitSchedule JSON (e.g. a run's learned_mean_schedule.json)")
    do.add_argument("--run", default=None, help="a run trained with env.action_space profiles: K profile variants, "
                                                "one picked per input group and step by the exported policy")
    do.add_argument("--model", default=None, help="shipped model or checkpoint folder (default: the schedule's)")
    do.add_argument("--n", type=int, default=16, help="images (the ONNX models' fixed batch size)")
    do.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    do.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    do.add_argument("--calib-n", type=int, default=32,
                    help="calibration images (calib noise bank) for the static activation ranges ORT and the "
                         "simulation share")
    do.add_argument("--out", default=None, help="folder for the models and manifest.json "
                                                "(default out/deploy_onnx/<schedule stem>)")
    do.add_argument("--json", action="store_true", help="print the result (errors, timings, segments, applied bits) "
                                                        "as JSON")
    do.set_defaults(fn=cmd_deploy_onnx)

    c = sub.add_parser("calibrate", help="store static activation ranges with a model (its checkpoint folder)")
    c.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
    c.add_argument("--steps", type=_int_at_least(1), default=10, help="sampler steps")
    c.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="sampler")
    c.add_argument("--buckets", type=_int_at_least(1), default=4, help="step buckets (ranges per layer and bucket)")
    c.add_argument("--n", type=_int_at_least(1), default=32, help="calibration images (the calib noise bank)")
    c.set_defaults(fn=cmd_calibrate)

    la = sub.add_parser("latency", help="measure a per-(layer, b_w, b_a) latency table on this device (env.cost "
                                        "latency); stored with the model unless --out")
    la.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
    la.add_argument("--batch", type=_int_at_least(1), default=64, help="images per timed call")
    la.add_argument("--repeats", type=_int_at_least(1), default=7, help="timed calls per layer and kernel (median)")
    la.add_argument("--bit-choices", default=None, help="comma-separated choice set (default 2,3,4,5,6,8,16,32)")
    la.add_argument("--out", default=None, help="table JSON (default <checkpoint>/latency/<device>.json)")
    la.add_argument("--json", action="store_true", help="print the table summary and the BOPs comparison as JSON")
    la.set_defaults(fn=cmd_latency)

    pr = sub.add_parser("profiles", help="find K precision profiles (per-layer bits; sensitivity ILP at budgets "
                                         "around the target) for env.action_space 'profiles'; write the JSON file")
    pr.add_argument("--config", default=None, help="YAML run config whose env fields to use (else the defaults)")
    pr.add_argument("--set", action="append", help="override an env field: key=value (e.g. env.num_steps=5)")
    pr.add_argument("--model", default=None, help="shipped model name or checkpoint folder (env.model)")
    pr.add_argument("--budget", type=float, default=None, help="target cost_rel_fp32 the budgets spread around "
                                                               "(env.budget; 0.0625 = uniform W8A8)")
    pr.add_argument("--num-profiles", type=_int_at_least(1), default=None, help="K (env.num_profiles, default 4)")
    pr.add_argument("--spread", type=float, default=None, help="ratio between neighbouring budgets "
                                                               "(env.profile_spread, default 2)")
    pr.add_argument("--out", required=True, help="profiles JSON file to write (atomically)")
    pr.add_argument("--json", action="store_true", help="print the profiles summary as JSON")
    pr.set_defaults(fn=cmd_profiles)

    d = sub.add_parser("demo", help="the main job: train a policy on digits16, evaluate vs baselines, export")
    d.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "experiments" / "configs"
                                           / "digits16_ppo_jax.yaml"), help="YAML run config")
    d.add_argument("--set", action="append", help="override a field: key=value (dotted, e.g. env.lam=2)")
    run_args(d)
    d.add_argument("--out", default="out/demo", help="run directory of the demo")
    d.set_defaults(fn=cmd_demo)
    _show_defaults(p)
    return p


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr (exit 2) that names the flag; ``--help`` shows the rest."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows each flag's default where its help does not already (and the default is a value)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" not in h and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            h += " (default: %(default)s)"
        return h


def _show_defaults(p: argparse.ArgumentParser) -> None:
    p.formatter_class = _DefaultsFormatter
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sp in act.choices.values():
                _show_defaults(sp)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _cli_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or environment (bad value, file, YAML, permission, lock), not bugs."""
    import yaml

    from .rundir import LockedError

    return (OSError, ValueError, ImportError, yaml.YAMLError, LockedError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; an input or environment error is one line on stderr and exit status 2 (the full
    traceback with ``--debug``)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except _cli_errors() as e:
        if args.debug:
            raise
        print(f"qpolicy: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qpolicy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
