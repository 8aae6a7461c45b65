"""Experiment tracking: wandb (offline unless asked) plus a local metrics.jsonl that is always written."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")


class Tracker:
    """Logs dicts of scalars to ``<run_dir>/metrics.jsonl`` and, unless disabled, to wandb.

    mode: "offline" (default; files under <run_dir>/wandb, sync later with `wandb sync`),
    "online" (needs network and a login) or "disabled"."""

    def __init__(self, run_dir: str | Path, *, config: dict | None = None, mode: str | None = None,
                 project: str = "qpolicy", name: str | None = None, resume: bool = False):
        mode = mode or os.environ.get("WANDB_MODE", "offline")
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a" if resume else "w")
        self._wandb = None
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=project, name=name or self.run_dir.name, dir=str(self.run_dir),
                                     config=config or {}, mode=mode, reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": int(step), **{k: float(v) if hasattr(v, "__float__") else v for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=int(step))

    def close(self) -> None:
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
