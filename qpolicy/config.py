"""Configs as the single source: the one validation helper of the frozen config dataclasses, and command-line
flags generated from a config's fields and its docstring (a ``name: help`` line per field, CleanRL-style typed args).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re
import types
import typing
from typing import Any, Sequence

_MISSING = dataclasses.MISSING


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def check(name: str, value: Any, *, kind: str, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, hi_open: bool = False, choices: Sequence[Any] | None = None,
          optional: bool = False) -> Any:
    """Validate one config field and return its normalised value; ``ValueError`` naming ``name`` otherwise.

    kind: "int" | "real" (finite unless ``hi`` is inf) | "bool" | "choice" (one of ``choices``) | "str".
    lo / hi: bounds (inclusive unless lo_open / hi_open). optional: None passes through."""
    if optional and value is None:
        return None
    if kind == "choice":
        if value not in tuple(choices or ()):
            raise ValueError(f"{name} must be one of {tuple(choices or ())}, got {value!r}")
        return value
    if kind == "bool":
        if type(value).__name__ not in ("bool", "bool_"):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return bool(value)
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        return value
    ok = is_int(value) if kind == "int" else is_real(value) and not math.isnan(value)
    if ok and kind == "real" and math.isinf(value) and not (hi is not None and math.isinf(hi) and value > 0):
        ok = False
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None and not math.isinf(hi):
        ok = value < hi if hi_open else value <= hi
    if not ok:
        what = "an integer" if kind == "int" else "a finite number"
        bounds = []
        if lo is not None:
            bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None and not math.isinf(hi):
            bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
        raise ValueError(f"{name} must be {what}{' ' + ' and '.join(bounds) if bounds else ''}, got {value!r}")
    return int(value) if kind == "int" else float(value)


# ----------------------------------------------------------------------------------------------- CLI generation
def field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``name: text`` lines of a config class's docstring (continuation lines that are
    indented further are joined)."""
    out: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    cur = None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"^\s{4}(\w+): (.*)$", line)
        if m and m.group(1) in names:
            cur = m.group(1)
            out[cur] = m.group(2).strip()
        elif cur and re.match(r"^\s{8,}\S", line):
            out[cur] += " " + line.strip()
        else:
            cur = None
    return out


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, optional) of an annotation (strings resolved by the caller)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


_NONE = "none"


def _or_none(conv):
    def f(s: str):
        return _NONE if s.strip().lower() == _NONE else conv(s)
    return f


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, exclude: Sequence[str] = (),
                    required: Sequence[str] = (), choices: dict[str, Sequence[str]] | None = None,
                    flags: dict[str, str] | None = None, defaults: dict[str, Any] | None = None) -> None:
    """Add one ``--field-name`` flag per field of the dataclass ``cls`` (type, default and help from the class).

    Defaults are shown in ``--help`` and left as None in the namespace so :func:`config_kwargs` passes only the
    flags the user gave. ``flags`` renames a field's flag; ``defaults`` overrides the shown default."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    choices = choices or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp, optional = _base_type(hints[f.name])
        default = (defaults or {}).get(f.name, f.default if f.default is not _MISSING else None)
        conv: Any = {int: int, float: float, bool: _parse_bool}.get(tp, str)
        if optional:  # "none" sets the field to None (config_kwargs maps the sentinel back)
            conv = _or_none(conv)
        nargs = None
        if typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            conv, nargs = {int: int, float: float}.get(inner, str), "+"
        text = helps.get(f.name, "")
        shown = "" if f.name in required else f" (default: {default})"
        flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        parser.add_argument(flag, dest=f.name, type=conv, nargs=nargs, default=None, required=f.name in required,
                            choices=choices.get(f.name), metavar=f.name.upper() if not choices.get(f.name) else None,
                            help=(text + shown).strip() + (" ('none' for no value)" if optional
                                                          and f.name not in required else ""))


def config_kwargs(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The ``cls`` fields the user set on the command line (flags left at None are omitted)."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is None:
            continue
        out[f.name] = tuple(v) if isinstance(v, list) else (None if v == _NONE else v)
    return out


# ----------------------------------------------------------------------------------------------- resource guards
def available_memory() -> int:
    """Bytes of memory this process may still use (available physical memory; total if unknown)."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(name: str, n: Any, bytes_each: int, *, what: str = "images", fraction: float = 0.5) -> int:
    """Refuse before any work a count ``n`` (an integer >= 1) whose arrays (``bytes_each`` per item) would need
    more than ``fraction`` of the available memory; the message names the flag and the largest accepted value."""
    n = check(name, n, kind="int", lo=1)
    budget = int(available_memory() * fraction)
    if n * bytes_each > budget:
        raise ValueError(f"{name}={n} {what} need about {n * bytes_each / 2**30:.3g} GiB, more than half the "
                         f"available memory ({budget / 2**30:.3g} GiB): use {name} <= {max(budget // bytes_each, 1)}")
    return n
