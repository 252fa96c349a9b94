"""Values typed by dataclass field annotations: the one place that reads option types.

A method's ``Options`` dataclass is the single source of its option types. The CLI parses
``--option key=value`` strings with :func:`parse_as`; ``Method.options`` checks values that arrive
already typed (a ``--config`` JSON file, the Python API) with :func:`conforms`. Both name the
expected type with :func:`type_name`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of dataclass ``cls`` (string annotations included)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if _union(tp):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (str,)
        return f"a comma list of {type_name(inner)}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "text"}.get(tp, getattr(tp, "__name__", str(tp)))


def parse_as(text: str, tp: Any) -> Any:
    """``text`` as a value of ``tp`` (bool: true/false/1/0/yes/no; int refuses 1.5; lists comma-separated); ValueError if not."""
    if _union(tp):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_as(text, arg)
            except ValueError:
                continue
        raise ValueError(text)
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (str,)
        body = text.strip().removeprefix("[").removesuffix("]")
        return [parse_as(part.strip().strip("'\""), inner) for part in body.split(",") if part.strip()]
    if tp is bool:
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
        raise ValueError(text)
    if tp is int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
            raise ValueError(text)
        return int(text)
    if tp is float:
        return float(text)
    if tp is str or tp is Any:
        return text
    raise ValueError(text)


def conforms(value: Any, tp: Any) -> bool:
    """Whether an already-typed ``value`` fits ``tp`` (an int fits a float field; a bool fits no int field)."""
    if tp is Any:
        return True
    if _union(tp):
        return any(conforms(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(conforms(v, inner) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


__all__ = ["conforms", "field_types", "parse_as", "type_name"]
