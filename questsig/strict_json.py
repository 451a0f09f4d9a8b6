"""Strict RFC 8259 JSON, as the hub and fledger read client frames.

Python's ``json`` accepts ``NaN``/``Infinity``, lone surrogate escapes and nesting as deep as
the interpreter's stack; these are refused here. Duplicate keys: the last wins, and
:func:`duplicates` names the ones a caller asked to watch.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Collection

MAX_DEPTH = 128


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Repeated(dict):  # type: ignore[type-arg]
    """An object in which some names appeared more than once (the last value kept)."""

    repeated: frozenset[str] = frozenset()


def _repeats_marker(watch: frozenset[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def keep_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(pairs)
        if len(value) == len(pairs):
            return value
        seen: set[str] = set()
        repeated: set[str] = set()
        for name, _ in pairs:
            (repeated if name in seen else seen).add(name)
        repeated &= watch
        if not repeated:
            return value
        marked = _Repeated(value)
        marked.repeated = frozenset(repeated)
        return marked

    return keep_repeats


_WATCHING: dict[frozenset[str], json.JSONDecoder] = {}


def _watching_decoder(watch: Collection[str]) -> json.JSONDecoder:
    """A decoder that marks the objects in which one of the ``watch`` names repeats, made
    once per set of names (a hub parses every message with the same one)."""
    key = watch if isinstance(watch, frozenset) else frozenset(watch)
    decoder = _WATCHING.get(key)
    if decoder is None:
        decoder = json.JSONDecoder(parse_constant=_reject_constant,
                                   object_pairs_hook=_repeats_marker(key))
        if len(_WATCHING) < 64:
            _WATCHING[key] = decoder
    return decoder


def duplicates(value: Any) -> frozenset[str]:
    """The ``watch`` names (of :func:`parse`) repeated in the object ``value``, not in its
    children."""
    return getattr(value, "repeated", frozenset())


def parse(text: str, watch: Collection[str] = ()) -> Any:
    """Strict RFC 8259 JSON; raises ValueError for anything else. With ``watch`` (the names
    whose repeats matter to the caller), objects in which a name repeats are marked for
    :func:`duplicates`."""
    if text.startswith("\ufeff"):
        raise ValueError("BOM")
    # Marking repeats costs one call per object; finding first whether a watched name occurs
    # twice cost more (a scan of the whole text per name: 20 µs for a 3 KB hub message,
    # against 4 µs for the whole parse).
    decoder = _watching_decoder(watch) if watch else _decoder
    escapes = "\\u" in text
    try:
        value = decoder.decode(text)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise ValueError("nested too deep")
    if escapes and _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
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
