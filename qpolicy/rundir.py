"""Run and output directories as transactions: the config fingerprint that checkpoints and policies carry, one
writer at a time (an exclusive lock file), and the rules for reusing a directory.

A directory written by a qpolicy command (a run directory, a denoiser checkpoint folder under training, an
evaluation folder) is held with :func:`locked` for the whole command: a second writer gets a clear error naming
the holder (pid, host, command). The lock is an ``flock`` on ``<dir>/.qpolicy.lock``, so the kernel releases it
when its holder dies (kill -9 included): a stale lock file of a dead process is simply taken over.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

LOCK_FILE = ".qpolicy.lock"


class LockedError(RuntimeError):
    """Another process holds the directory's lock."""


def fingerprint(mapping: Mapping[str, Any]) -> str:
    """The hash of a config in canonical form (sorted keys, tuples as lists): 16 hex digits of sha256."""
    text = json.dumps(mapping, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_fingerprint(found: str | None, expected: str, *, what: str, where: str | Path) -> None:
    """Refuse ``what`` (a policy, a checkpoint) made under another config: ``ValueError`` naming both
    fingerprints. ``found`` None (written before fingerprints existed) passes with a warning."""
    if found is None:
        import warnings

        warnings.warn(f"{what} in {where} carries no config fingerprint (written by an older qpolicy); "
                      "it is trusted to match the config", stacklevel=2)
        return
    if found != expected:
        raise ValueError(f"{what} in {where} was made under another config (fingerprint {found}, config "
                         f"{expected}): the config was changed after training; retrain into a new run directory "
                         "or restore the config it was trained with")


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config mappings."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            out.append(f"{prefix}{k}")
    return out


def _holder(path: Path) -> str:
    try:
        d = json.loads(path.read_text() or "{}")
        return f"pid {d.get('pid')} on {d.get('host')} ({d.get('cmd', '?')}, since {d.get('since', '?')})"
    except (OSError, ValueError):
        return "another process"


_HELD: dict[Path, int] = {}  # directories this process holds -> nesting depth (demo: train, then evaluate)


@contextlib.contextmanager
def locked(directory: str | Path, *, what: str = "run directory") -> Iterator[Path]:
    """Hold ``directory``'s exclusive lock (created with its parents) for the ``with`` block; re-entrant within
    one process. Raises :class:`LockedError` naming the holder when another process has it. A folder the block
    created and left empty (a command that failed before writing) is removed again."""
    import fcntl

    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{what} {d} is a file, not a directory")
    created = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    key = d.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield d
        finally:
            _HELD[key] -= 1
        return
    f = d / LOCK_FILE
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{what} {d} is in use by {_holder(f)}; wait for it to finish or use another "
                              f"directory (lock file {f})") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "cmd": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        _HELD[key] = 1
        try:
            yield d
        finally:
            del _HELD[key]
            os.ftruncate(fd, 0)  # the file stays (unlinking a lock file races with a waiting opener) ...
            if created and os.listdir(d) == [LOCK_FILE]:  # ... unless the command made the folder and left it empty
                f.unlink()
                d.rmdir()
    finally:
        os.close(fd)  # releases the flock


def check_writable_target(path: str | Path, *, what: str) -> Path:
    """Fail before any work if ``path`` (a file or folder to be written) cannot be created: a parent that is a
    regular file, or a directory without write permission. Returns the path."""
    p = Path(path)
    for parent in [p, *p.parents]:
        if parent.exists():
            if parent != p and not parent.is_dir():
                raise ValueError(f"{what} {p} cannot be created: {parent} is a file, not a directory")
            probe = parent if parent.is_dir() else parent.parent
            if not os.access(probe, os.W_OK | os.X_OK):
                raise ValueError(f"{what} {p} cannot be written: no write permission in {probe}")
            return p
    return p
