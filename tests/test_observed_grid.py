"""The coordinator records every message that got no reply before the round timeout, by
site name, round and stage (Flower's workflows drop such messages without a word)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.common import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmed.configure import compose_config
from fedmed.coordinator.grid import ObservedGrid
from fedmed.coordinator.recorder import RunRecorder


@pytest.fixture(autouse=True)
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built inside a run, as the ServerApp does."""
    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


class TwoOfThreeGrid:
    """Delivers to nodes 1, 2, 3; node 3 took its message and never answered."""

    def __init__(self) -> None:
        self.calls = 0

    def send_and_receive(self, messages: list[Message], *, timeout: float | None) -> list[Message]:
        self.calls += 1
        replies = []
        for number, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{self.calls}-{number}"
            node = message.metadata.dst_node_id
            if node == 3 and self.calls > 1:
                continue
            content = RecordDict({"fitres.metrics": ConfigRecord({"site": f"site{node}"})})
            replies.append(Message(content, reply_to=message))
        return replies


def _train(node: int, server_round: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type="train", group_id=str(server_round))


def test_a_site_that_never_replies_is_recorded_by_name_round_and_stage(tmp_path: Path) -> None:
    recorder = RunRecorder(compose_config(["dataset=heart"]), tmp_path, 3)
    grid = ObservedGrid(TwoOfThreeGrid(), recorder, round_offset=2)

    first = grid.send_and_receive([_train(n, 1) for n in (1, 2, 3)], timeout=30.0)
    assert len(first) == 3 and recorder.failures == []
    assert grid.site_name(3) == "site3" and grid.site_name(9) == "node 9"

    second = grid.send_and_receive([_train(n, 2) for n in (1, 2, 3)], timeout=30.0)
    assert len(second) == 2
    [failure] = recorder.failures
    assert (failure.site, failure.round, failure.stage) == ("site3", 4, "train")
    assert "no reply within federation.round_timeout (30.0 s)" in failure.error


def test_an_error_reply_from_the_superlink_counts_as_an_answer(tmp_path: Path) -> None:
    class ErrorGrid:
        def send_and_receive(self, messages: list[Message], **_: Any) -> list[Message]:
            for number, message in enumerate(messages):
                message.metadata.__dict__["_message_id"] = f"e{number}"
            return [Message(Error(code=5, reason="node unavailable"), reply_to=m) for m in messages]

    recorder = RunRecorder(compose_config(["dataset=heart"]), tmp_path, 2)
    replies = ObservedGrid(ErrorGrid(), recorder).send_and_receive([_train(7, 1)], timeout=5.0)
    assert len(replies) == 1 and recorder.failures == []
