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


def test_a_plain_round_without_a_timeout_waits_at_most_the_round_timeout(tmp_path: Path) -> None:
    """Flower's plain fit and evaluate workflows call send_and_receive with no timeout."""
    inner = TwoOfThreeGrid()
    timeouts: list[float | None] = []
    send = inner.send_and_receive

    def spy(messages: list[Message], *, timeout: float | None) -> list[Message]:
        timeouts.append(timeout)
        return send(messages, timeout=timeout)

    inner.send_and_receive = spy  # type: ignore[method-assign]
    recorder = RunRecorder(compose_config(["dataset=heart"]), tmp_path, 3)
    grid = ObservedGrid(inner, recorder, round_timeout=45.0)
    grid.send_and_receive([_train(1, 1)])
    grid.send_and_receive([_train(1, 2)], timeout=None)
    grid.send_and_receive([_train(1, 3)], timeout=7.0)  # a SecAgg+ stage's own timeout stays
    assert timeouts == [45.0, 45.0, 7.0]


class ConnectingGrid:
    """Sites connect one by one, as Flower's simulation registers its nodes in another thread."""

    def __init__(self, connect_every: int, total: int) -> None:
        self.polls = 0
        self.connect_every = connect_every
        self.total = total

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return list(range(min(self.total, self.polls // self.connect_every)))


def test_round_one_waits_until_every_site_has_connected(tmp_path: Path) -> None:
    recorder = RunRecorder(compose_config(["dataset=heart"]), tmp_path, 4)
    inner = ConnectingGrid(connect_every=3, total=4)
    assert ObservedGrid(inner, recorder).wait_for_sites(4, timeout=30.0) == 4
    assert inner.polls == 12


def test_a_site_that_never_connects_delays_round_one_only_by_the_connect_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = RunRecorder(compose_config(["dataset=heart"]), tmp_path, 4)
    grid = ObservedGrid(ConnectingGrid(connect_every=1, total=3), recorder)
    assert grid.wait_for_sites(4, timeout=0.3) == 3
    assert "only 3 of 4 sites connected after federation.connect_timeout=0.3 s" in (
        capsys.readouterr().out
    )
