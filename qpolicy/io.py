"""Atomic file writing: write to a temporary name in the same folder, then rename.

Nothing is ever left half-written: a crash leaves either the old file or the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the temp name lets clean_stale_temps remove what a killed writer left
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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


_TEMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, *, max_age_s: float = 3600.0) -> list[Path]:
    """Remove the temp files of :func:`atomic_write_bytes` that killed writers left in ``folder``: those whose
    writer pid is dead, and unattributed ones older than ``max_age_s``. Returns the removed paths."""
    import time

    removed = []
    d = Path(folder)
    if not d.is_dir():
        return removed
    for f in d.glob(".*.tmp"):
        m = _TEMP.match(f.name)
        try:
            stale = not _alive(int(m.group(1))) if m else time.time() - f.stat().st_mtime > max_age_s
            if stale:
                f.unlink()
                removed.append(f)
        except OSError:
            continue
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as None, so its JSON is standard (null, never bare NaN)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "dtype") and getattr(obj, "shape", None) == () and obj.dtype.kind in "fiub":
        return finite_json(obj.item())
    return obj


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Standard JSON of ``obj`` (non-finite floats as null; numpy scalars as numbers)."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False, default=float)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, dumps(obj, indent=indent) + "\n")


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


# ------------------------------------------------------------------------------------------- verified caches
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_cache(path: str | os.PathLike, data: bytes, *, key: str, **info: Any) -> Path:
    """Write a cache file and its sidecar ``<file>.json`` (the key it was made for, byte count, sha256, ``info``
    such as shape and dtype), each atomically, data first; stale temp files of killed writers are removed."""
    path = Path(path)
    clean_stale_temps(path.parent)
    atomic_write_bytes(path, data)
    atomic_write_json(_sidecar(path), {"key": key, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                       **info})
    return path


def read_cache(path: str | os.PathLike, *, key: str) -> tuple[bytes, dict] | None:
    """(data, sidecar) of a cache file verified against its sidecar and ``key``; None when absent. A bad file (no
    or corrupt sidecar, another key, truncated, checksum mismatch) is named in a warning and removed, so the
    caller recomputes it."""
    path = Path(path)
    if not path.exists():
        return None
    problem, meta = None, {}
    try:
        meta = json.loads(_sidecar(path).read_text())
        data = path.read_bytes()
        if not isinstance(meta, dict):
            problem = "its sidecar is not a JSON object"
        elif meta.get("key") != key:
            problem = f"it was made for {meta.get('key')!r}, not {key!r}"
        elif meta.get("bytes") != len(data) or meta.get("sha256") != hashlib.sha256(data).hexdigest():
            problem = "its checksum does not match (truncated or overwritten)"
    except FileNotFoundError:
        problem = f"its sidecar {_sidecar(path).name} is missing"
    except (OSError, ValueError) as e:
        problem = f"unreadable ({e})"
    if problem is None:
        return data, meta
    drop_cache(path, problem)
    return None


def drop_cache(path: str | os.PathLike, problem: str) -> None:
    """Warn that cache file ``path`` is bad (``problem``) and remove it with its sidecar."""
    path = Path(path)
    warnings.warn(f"cache file {path} is invalid: {problem}; removed, recomputing", stacklevel=3)
    for f in (path, _sidecar(path)):
        try:
            f.unlink()
        except FileNotFoundError:
            pass


def save_cached_array(path: str | os.PathLike, array: Any, *, key: str) -> Path:
    """One array as a verified cache file (.npy + sidecar; see :func:`write_cache`)."""
    import io

    import numpy as np

    a = np.asarray(array)
    buf = io.BytesIO()
    np.save(buf, a)
    return write_cache(path, buf.getvalue(), key=key, shape=list(a.shape), dtype=str(a.dtype))


def load_cached_array(path: str | os.PathLike, *, key: str, shape: tuple | None = None) -> Any:
    """The array of a verified cache file (None when absent or bad; a bad one is removed). ``shape``: the shape
    the caller needs (a mismatch counts as bad), None to accept the sidecar's."""
    import io

    import numpy as np

    got = read_cache(path, key=key)
    if got is None:
        return None
    data, meta = got
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        drop_cache(path, f"not a .npy array ({e})")
        return None
    want = tuple(meta.get("shape", a.shape)) if shape is None else tuple(shape)
    if a.shape != want or str(a.dtype) != meta.get("dtype", str(a.dtype)):
        drop_cache(path, f"array {a.shape} {a.dtype} does not match {want} {meta.get('dtype')}")
        return None
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        drop_cache(path, "it holds NaN or inf")
        return None
    return a
