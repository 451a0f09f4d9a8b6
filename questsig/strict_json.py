"""Strict RFC 8259 JSON, as the hub and fledger read client frames.

Python's ``json`` accepts ``NaN``/``Infinity``, lone surrogate escapes and nesting as deep as
the interpreter's stack; these are refused here. Duplicate keys: the last wins.
"""
from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 128


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse(text: str) -> Any:
    """Strict RFC 8259 JSON; raises ValueError for anything else."""
    if text.startswith("\ufeff"):
        raise ValueError("BOM")
    try:
        value = _decoder.decode(text)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise ValueError("nested too deep")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise ValueError("lone surrogate")
    return value


def _children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return list(value.keys()) + list(value.values())
    if isinstance(value, list):
        return value
    return []


def _depth(value: Any) -> int:
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in _children(item))
    return deepest


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= ch <= "\udfff" for ch in item):
                return True
        else:
            stack.extend(_children(item))
    return False
