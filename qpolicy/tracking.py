"""Experiment tracking: wandb (offline unless asked) plus a local metrics.jsonl that is always written."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .io import dumps

WANDB_MODES = ("offline", "online", "disabled")


class Tracker:
    """Logs dicts of scalars to ``<run_dir>/metrics.jsonl`` and, unless disabled, to wandb.

    mode: "offline" (default; files under <run_dir>/wandb, sync later with `wandb sync`),
    "online" (needs network and a login) or "disabled".
    resume_at: the step of the checkpoint a resumed run starts from: rows past it (logged by the run that died
    after that checkpoint) and a torn last line are dropped, so every step is logged once, in order. None starts
    a fresh file."""

    def __init__(self, run_dir: str | Path, *, config: dict | None = None, mode: str | None = None,
                 project: str = "qpolicy", name: str | None = None, resume_at: int | None = None):
        mode = mode or os.environ.get("WANDB_MODE", "offline")
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_at is not None:
            truncate_metrics(path, resume_at)
        self._jsonl = open(path, "a" if resume_at is not None else "w")
        self._wandb = None
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=project, name=name or self.run_dir.name, dir=str(self.run_dir),
                                     config=config or {}, mode=mode, reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": int(step), **{k: float(v) if hasattr(v, "__float__") else v for k, v in metrics.items()}}
        self._jsonl.write(dumps(row) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=int(step))

    def close(self) -> None:
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict]:
    """The complete rows of a metrics.jsonl (a torn or corrupt line, left by a killed writer, is skipped)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the rows of ``path`` with step <= ``step`` (atomically rewritten); returns how many were dropped."""
    from .io import atomic_write_text

    p = Path(path)
    if not p.exists():
        return 0
    rows = read_metrics(p)
    keep = [r for r in rows if r["step"] <= step]
    n_lines = len(p.read_text().splitlines())
    if len(keep) != n_lines:
        atomic_write_text(p, "".join(dumps(r) + "\n" for r in keep))
    return n_lines - len(keep)
