"""Trigger filters: a small, safe expression language over an event's fields.

``type == "vote.cast" and data.amount > 10``. Names are dotted paths into the CloudEvent
(``data.x.y``, ``subject``, an extension). Supported: comparisons (``== != < <= > >= in``,
``not in``), ``and``/``or``/``not``, string/number/bool/null literals and lists of them.
A missing field is ``null``; a comparison that cannot be made (``null > 10``) is false, so a
malformed event is filtered out, never a crash.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

from dispatcher.events import Event

Predicate = Callable[[Event], bool]
_Getter = Callable[[Event], Any]

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class FilterSyntaxError(ValueError):
    """The expression is not one this language accepts."""


def compile_filter(expression: str) -> Predicate | None:
    """Compile ``expression`` to a predicate; ``None`` for an empty expression (keep all)."""
    if not expression.strip():
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise FilterSyntaxError(f"invalid filter expression at column {exc.offset}: {exc.msg}") from None
    getter = _compile(tree.body)

    def predicate(event: Event) -> bool:
        try:
            return bool(getter(event))
        except (TypeError, ValueError):
            return False

    return predicate


def _path(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _path(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _compile(node: ast.expr) -> _Getter:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        value = node.value
        return lambda _e: value
    if isinstance(node, ast.Name) and node.id in _LITERALS:
        literal = _LITERALS[node.id]
        return lambda _e: literal
    if isinstance(node, (ast.Name, ast.Attribute)):
        path = _path(node)
        if path is None:
            raise FilterSyntaxError(f"unsupported name in filter: {ast.unparse(node)}")
        return lambda e: e.field(path)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_compile(item) for item in node.elts]
        return lambda e: [item(e) for item in items]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _compile(node.operand)
        return lambda e: not inner(e)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        negative = -node.operand.value  # type: ignore[operator]
        return lambda _e: negative
    if isinstance(node, ast.BoolOp):
        parts = [_compile(value) for value in node.values]
        if isinstance(node.op, ast.And):
            return lambda e: all(part(e) for part in parts)
        return lambda e: any(part(e) for part in parts)
    if isinstance(node, ast.Compare):
        left = _compile(node.left)
        steps = []
        for op, right in zip(node.ops, node.comparators, strict=True):
            if type(op) not in _COMPARE:
                raise FilterSyntaxError(f"unsupported comparison in filter: {ast.unparse(node)}")
            steps.append((_COMPARE[type(op)], _compile(right)))

        def compare(e: Event) -> bool:
            current = left(e)
            for fn, right_getter in steps:
                other = right_getter(e)
                if current is None or other is None:
                    if fn not in (operator.eq, operator.ne):
                        return False
                if not fn(current, other):
                    return False
                current = other
            return True

        return compare
    raise FilterSyntaxError(f"unsupported filter expression: {ast.unparse(node)}")
