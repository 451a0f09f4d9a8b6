"""JSON as JavaScript's ``JSON.parse`` reads it and ``JSON.stringify`` writes it.

The PeerJS server re-serialises every message it forwards, so the bytes a client receives are
JavaScript's rendering of what it sent: numbers as doubles (``1.0`` becomes ``1``, ``1e2``
becomes ``100``, ``1e400`` becomes ``null``), object keys that are array indices first and in
ascending order, lone surrogates escaped as ``\\udXXX``, no spaces. Python's ``json`` differs on
each of these, and also accepts ``NaN`` and ``Infinity``, which JavaScript refuses.
"""
from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def parse(text: str) -> Any:
    """``JSON.parse(text)``; raises ValueError where JavaScript throws."""
    if text.startswith("\ufeff"):
        raise ValueError("a byte order mark is not JSON")
    try:
        return _decoder.decode(text)
    except RecursionError:  # JavaScript nests deeper than Python's stack; refusing is safer
        raise ValueError("nested too deep") from None


def truthy(value: Any) -> bool:
    """JavaScript's truthiness of a parsed JSON value: ``[]`` and ``{}`` are true, ``0`` and
    ``""`` false."""
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, str):
        return value != ""
    return True


def stringify(value: Any) -> str:
    """``JSON.stringify(value)`` for a value :func:`parse` returned (or built of the same
    types)."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)


_ESCAPE = re.compile(r'[\x00-\x1f"\\\ud800-\udfff]')
_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
          "\t": "\\t"}
# index keys: canonical decimal strings of 0 .. 2**32 - 2
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")
_MAX_INDEX = 2 ** 32 - 2


def _quote(text: str) -> str:
    return '"' + _ESCAPE.sub(lambda m: _SHORT.get(m.group()) or "\\u%04x" % ord(m.group()),
                             text) + '"'


def _is_index(key: str) -> bool:
    return _INDEX.fullmatch(key) is not None and int(key) <= _MAX_INDEX


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_quote(value))
    elif isinstance(value, (int, float)):
        out.append(number(value))
    elif isinstance(value, dict):
        keys = list(value)
        indices = sorted((k for k in keys if _is_index(k)), key=int)
        ordered = indices + [k for k in keys if not _is_index(k)] if indices else keys
        out.append("{")
        for i, key in enumerate(ordered):
            if i:
                out.append(",")
            out.append(_quote(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")


def number(value: int | float) -> str:
    """A number as JavaScript writes the double nearest to it (Number.prototype.toString)."""
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        return "null"
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that round-trip, as ECMAScript's algorithm requires
    _, digits_tuple, exponent = Decimal(repr(abs(x))).normalize().as_tuple()
    digits = "".join(map(str, digits_tuple))
    k = len(digits)
    n = k + int(exponent)  # the value is 0.DIGITS x 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        text = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + text
