"""Removing leftovers at start: a container already gone, or whose removal is under way, is not an error (the
CI found a restarted replica that exited on the engine's 409 while Swarm removed its old job's container)."""

from __future__ import annotations

from typing import Any

import docker.errors
import pytest
import requests

from dispatcher.executors.engine import remove_containers


class Engine:
    """The two calls of the Docker SDK's low-level API that ``remove_containers`` makes, answering as told."""

    def __init__(self, answers: dict[str, int]) -> None:
        self.answers = answers
        self.removed: list[str] = []

    def containers(self, all: bool, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        return [{"Id": ident} for ident in self.answers]

    def remove_container(self, ident: str, force: bool, v: bool) -> None:
        status = self.answers[ident]
        if status == 204:
            self.removed.append(ident)
            return
        response = requests.Response()
        response.status_code = status
        error = docker.errors.NotFound if status == 404 else docker.errors.APIError
        raise error(f"{status}", response=response, explanation="removal of container is already in progress"
                    if status == 409 else "")


def test_gone_and_going_containers_count_and_others_are_removed():
    engine = Engine({"a": 204, "b": 409, "c": 404, "d": 204})
    assert remove_containers(engine, {"label": ["x"]}) == 3
    assert engine.removed == ["a", "d"]


def test_any_other_refusal_is_raised():
    with pytest.raises(docker.errors.APIError):
        remove_containers(Engine({"a": 500}), {"label": ["x"]})
