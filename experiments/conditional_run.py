"""The committed conditional run the request probes read (request_allocation.py, request_search.py): its eval setup
on an eval seed, its evaluation.json, the static schedules its evaluation scored, and the mean-BOPs target."""
import json
from types import SimpleNamespace

import numpy as np

from qpolicy.evaluation import setup


def load(run, n: int, eval_seed: int, target: float | None) -> SimpleNamespace:
    """s (qpolicy.evaluation.Setup), eng, cond (the model's conditioning), ev (evaluation.json), z (schedules.npz),
    target (``target``, default the learned policy's BOPs/FP32). A model without conditioning exits with a message."""
    s = setup(run, n=n, eval_seed=eval_seed)
    eng, cond = s.engine, s.engine.den.conditioning
    if cond is None:
        raise SystemExit(f"--run {run}: its model {eng.den.name!r} is not conditional (no request to read)")
    ev = json.loads((s.run_dir / "eval" / "evaluation.json").read_text())
    return SimpleNamespace(s=s, eng=eng, cond=cond, ev=ev, z=np.load(s.run_dir / "eval" / "schedules.npz"),
                           target=target or ev["policies"][0]["bops_rel_fp32"])
