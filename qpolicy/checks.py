"""Small type predicates shared by the config validators (bool is not a number here)."""
from __future__ import annotations

import numbers
from typing import Any


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)
