"""Atomic file writing: write to a temporary name in the same folder, then rename.

Nothing is ever left half-written: a crash leaves either the old file or the new one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; published files should be readable like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Read JSON, turning a missing or corrupt file into a clear ``ValueError``/``FileNotFoundError``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def save_pytree(path: str | os.PathLike, tree: Any) -> Path:
    """Save a pytree of arrays with flax msgpack serialization, atomically."""
    from flax import serialization
    import jax
    import numpy as np

    host = jax.tree_util.tree_map(np.asarray, tree)
    return atomic_write_bytes(path, serialization.msgpack_serialize(host))


def load_pytree(path: str | os.PathLike, *, what: str = "weights file") -> Any:
    """Load a pytree saved by :func:`save_pytree` (nested dicts of numpy arrays)."""
    from flax import serialization

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several types on corrupt input
        raise ValueError(f"{what} {path} is corrupt or not a qpolicy msgpack file: {e}") from None


def save_npy(path: str | os.PathLike, array: Any) -> Path:
    """Save one array as .npy, atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return atomic_write_bytes(path, buf.getvalue())
