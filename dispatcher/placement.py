"""Where a Swarm job may go when its function asks for a spread over a node label or a limit per node.

Swarm applies placement preferences and ``max_replicas_per_node`` per service, and the swarm executor makes each
batch a service of its own: passed through, both would do nothing (a service of one task is always "spread"). So
the daemon decides: from the function's running tasks per node (as the manager lists them, so replicas of the
daemon count each other's) it picks the label value with the fewest and leaves out the nodes at their limit, and
says so to Swarm as extra constraints. Swarm still chooses the node among those left, by its resources.

Constraints are read as Swarm reads them (``KEY == VALUE`` or ``KEY != VALUE``, values compared without case):
``node.id``, ``node.hostname``, ``node.role``, ``node.platform.os``, ``node.platform.arch``, ``node.labels.NAME``,
``engine.labels.NAME``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

_EXPRESSION = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(==|!=)\s*(\S(?:.*\S)?)\s*")
_KEYS = ("node.id", "node.hostname", "node.role", "node.platform.os", "node.platform.arch")
_LABELS = ("node.labels.", "engine.labels.")


def check_key(key: str) -> str:
    """``key`` if Swarm places by it (see the module's list), else ValueError saying which keys it knows."""
    if key in _KEYS or (key.startswith(_LABELS) and key not in _LABELS):
        return key
    raise ValueError(f"{key!r} is not a node attribute Swarm places by: one of {', '.join(_KEYS)}, node.labels.NAME "
                     "or engine.labels.NAME")


def attribute(node: Mapping[str, Any], key: str) -> str | None:
    """The value of ``key`` for ``node`` (as the Engine API's node list gives it); None when it has none."""
    spec, description = node.get("Spec", {}), node.get("Description", {})
    if key.startswith("node.labels."):
        return (spec.get("Labels") or {}).get(key.removeprefix("node.labels."))
    if key.startswith("engine.labels."):
        return ((description.get("Engine") or {}).get("Labels") or {}).get(key.removeprefix("engine.labels."))
    platform = description.get("Platform") or {}
    value: str | None = {"node.id": node.get("ID"), "node.hostname": description.get("Hostname"), "node.role": spec.get("Role"),
            "node.platform.os": platform.get("OS"), "node.platform.arch": platform.get("Architecture")}[key]
    return value


class Constraint(NamedTuple):
    key: str
    equal: bool
    value: str

    @classmethod
    def parse(cls, text: str) -> Constraint:
        found = _EXPRESSION.fullmatch(text)
        if not found:
            raise ValueError(f"{text!r} is not a constraint: write KEY == VALUE or KEY != VALUE "
                             "(e.g. \"node.role == worker\")")
        return cls(check_key(found[1]), found[2] == "==", found[3])

    def matches(self, node: Mapping[str, Any]) -> bool:
        value = attribute(node, self.key)
        same = value is not None and value.casefold() == self.value.casefold()
        return same == self.equal


def usable(node: Mapping[str, Any]) -> bool:
    """Whether Swarm may give ``node`` a new task: it is ready and its availability is active."""
    return bool(node.get("Status", {}).get("State") == "ready" and node.get("Spec", {}).get("Availability") == "active")


def choose(nodes: Sequence[Mapping[str, Any]], running: Mapping[str, int], constraints: Iterable[str],
           spread: Sequence[str] = (), max_per_node: int | None = None) -> list[str] | None:
    """The constraints to add to the function's next job, or None when every node that may run it is at
    ``max_per_node`` (the job is to wait for room).

    ``nodes``: the Swarm's nodes; ``running``: the function's running tasks by node id; ``constraints``: the
    function's own; ``spread``: node attributes to spread over, the first one first (Swarm's preferences, in
    order); ``max_per_node``: the function's tasks a node may run at once."""
    rules = [Constraint.parse(text) for text in constraints]
    eligible = [node for node in nodes if usable(node) and all(rule.matches(node) for rule in rules)]
    added: list[str] = []
    if max_per_node is not None:
        # Every node at its limit is left out, the ones down or drained too: they may be back before the job starts.
        full = sorted(node["ID"] for node in nodes if running.get(node["ID"], 0) >= max_per_node)
        added += [f"node.id != {ident}" for ident in full]
        room = [node for node in eligible if node["ID"] not in full]
    else:
        room = eligible
    if not eligible:
        return added  # no node may run it now (Swarm keeps the job pending and says why, until start_timeout)
    if not room:
        return None
    for key in spread:
        # Swarm's rule: tasks even over the attribute's values, the nodes without it a value of their own.
        tasks: Counter[str | None] = Counter()
        for node in eligible:
            tasks[attribute(node, key)] += running.get(node["ID"], 0)
        values = {attribute(node, key) for node in room}
        pick = min(values, key=lambda value: (tasks[value], value is None, value or ""))
        if pick is None:
            named = {value for value in (attribute(n, key) for n in nodes) if value is not None}
            added += [f"{key} != {value}" for value in sorted(named)]
        else:
            added.append(f"{key} == {pick}")
        eligible = [node for node in eligible if attribute(node, key) == pick]
        room = [node for node in room if attribute(node, key) == pick]
    return added


def running_by_node(tasks: Iterable[Mapping[str, Any]], done: Iterable[str]) -> Counter[str]:
    """How many of ``tasks`` (the function's, as the manager lists them) each node runs: assigned and not ended
    (``done``: the states of an ended task)."""
    ended = set(done)
    return Counter(str(task["NodeID"]) for task in tasks
                   if task.get("NodeID") and task.get("Status", {}).get("State") not in ended)
