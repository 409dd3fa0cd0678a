"""The choice of where a function's next Swarm job may go (dispatcher.placement): constraints read as Swarm reads
them, a spread over a node label, a limit per node. Node dicts as the Engine API lists them."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.config import FunctionConfig
from dispatcher.placement import Constraint, choose, running_by_node


def node(ident: str, zone: str | None = None, role: str = "worker", state: str = "ready",
         availability: str = "active", **labels: str) -> dict[str, Any]:
    spec_labels = dict(labels, **({"zone": zone} if zone else {}))
    return {"ID": ident, "Spec": {"Role": role, "Availability": availability, "Labels": spec_labels},
            "Status": {"State": state},
            "Description": {"Hostname": f"host-{ident}", "Platform": {"OS": "linux", "Architecture": "x86_64"},
                            "Engine": {"Labels": {"disk": "ssd"} if ident == "n1" else {}}}}


NODES = [node("n1", "a", role="manager"), node("n2", "b"), node("n3", "b")]


@pytest.mark.parametrize(("text", "ident", "matches"), [
    ("node.role == worker", "n2", True),
    ("node.role==manager", "n2", False),
    ("node.role != manager", "n1", False),
    ("node.labels.zone == B", "n3", True),  # values without case, as Swarm compares them
    ("node.labels.zone != b", "n1", True),
    ("node.labels.rack == r1", "n1", False),  # a node without the label: == fails, != holds
    ("node.labels.rack != r1", "n1", True),
    ("node.hostname == host-n2", "n2", True),
    ("node.id != n2", "n2", False),
    ("node.platform.arch == x86_64", "n3", True),
    ("engine.labels.disk == ssd", "n1", True),
    ("engine.labels.disk == ssd", "n2", False),
])
def test_constraints_match_nodes_as_swarm_reads_them(text: str, ident: str, matches: bool) -> None:
    assert Constraint.parse(text).matches(next(n for n in NODES if n["ID"] == ident)) is matches


@pytest.mark.parametrize("text", ["node.role = worker", "node.role ==", "zone == a", "node.labels. == a", "== a"])
def test_a_malformed_constraint_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Constraint.parse(text)


def test_nothing_is_added_without_a_spread_or_a_limit() -> None:
    assert choose(NODES, {"n1": 5}, []) == []


def test_a_spread_picks_the_label_value_with_the_fewest_running_jobs() -> None:
    assert choose(NODES, {}, [], spread=["node.labels.zone"]) == ["node.labels.zone == a"]
    assert choose(NODES, {"n1": 1}, [], spread=["node.labels.zone"]) == ["node.labels.zone == b"]
    # zone b's two nodes count together: two there, one in a.
    assert choose(NODES, {"n1": 1, "n2": 1, "n3": 1}, [], spread=["node.labels.zone"]) == ["node.labels.zone == a"]
    # Only the nodes the function's constraints allow count: here zone a is out.
    assert choose(NODES, {"n2": 3}, ["node.role == worker"], spread=["node.labels.zone"]) == ["node.labels.zone == b"]


def test_nodes_without_the_label_are_a_value_of_their_own() -> None:
    nodes = [*NODES, node("n4")]
    assert choose(nodes, {"n1": 1, "n2": 1}, [], spread=["node.labels.zone"]) == \
        ["node.labels.zone != a", "node.labels.zone != b"]


def test_spreads_apply_in_order() -> None:
    nodes = [node("n1", "a", rack="r1"), node("n2", "a", rack="r2"), node("n3", "b", rack="r1")]
    assert choose(nodes, {"n1": 1, "n3": 1}, [], spread=["node.labels.zone", "node.labels.rack"]) == \
        ["node.labels.zone == a", "node.labels.rack == r2"]


def test_a_limit_leaves_out_full_nodes_and_says_when_none_has_room() -> None:
    assert choose(NODES, {"n1": 2, "n2": 1}, [], max_per_node=2) == ["node.id != n1"]
    assert choose(NODES, {"n1": 1, "n2": 1, "n3": 1}, [], max_per_node=1) is None
    # A full node that is down is left out too: it may be back before the job starts.
    down = [node("n1", "a", state="down"), node("n2", "b")]
    assert choose(down, {"n1": 1}, [], max_per_node=1) == ["node.id != n1"]
    # Full nodes the function may not run on anyway do not make it wait.
    assert choose(NODES, {"n1": 1}, ["node.role == worker"], max_per_node=1) == ["node.id != n1"]


def test_a_spread_and_a_limit_together_pick_a_value_with_room() -> None:
    # Zone a has fewer running jobs, but its only node is full: zone b it is.
    assert choose(NODES, {"n1": 1, "n2": 1, "n3": 1}, [], spread=["node.labels.zone"], max_per_node=2) == \
        ["node.labels.zone == a"]
    assert choose(NODES, {"n1": 2, "n2": 1, "n3": 1}, [], spread=["node.labels.zone"], max_per_node=2) == \
        ["node.id != n1", "node.labels.zone == b"]


def test_no_node_that_may_run_it_leaves_the_choice_to_swarm() -> None:
    """Nothing eligible (all drained or down, or no match): the job is made and Swarm keeps it pending with its reason
    until start_timeout; waiting for room would only hide why."""
    drained = [node("n1", "a", availability="drain"), node("n2", "b", state="down")]
    assert choose(drained, {}, [], spread=["node.labels.zone"], max_per_node=1) == []


def test_running_counts_only_assigned_tasks_that_have_not_ended() -> None:
    tasks = [{"NodeID": "n1", "Status": {"State": "running"}}, {"NodeID": "n1", "Status": {"State": "starting"}},
             {"NodeID": "n2", "Status": {"State": "complete"}}, {"NodeID": "", "Status": {"State": "pending"}}]
    assert running_by_node(tasks, {"complete", "failed"}) == {"n1": 2}


def test_the_config_takes_a_list_or_a_compose_style_table() -> None:
    listed = FunctionConfig(image="x", placement=["node.role == worker"])
    assert listed.placement.constraints == ["node.role == worker"] and not listed.placement.chosen_by_daemon
    table = FunctionConfig(image="x", placement={"constraints": [" node.role == worker "],
                                                 "preferences": [{"spread": "node.labels.zone"}],
                                                 "max_replicas_per_node": 2})
    assert table.placement.constraints == ["node.role == worker"]
    assert table.placement.chosen_by_daemon and table.placement.max_replicas_per_node == 2
    assert not FunctionConfig(image="x").placement
