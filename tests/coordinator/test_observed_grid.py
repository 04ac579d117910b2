"""The coordinator records every message that got no reply before the round timeout, by
site name, round and stage (Flower's workflows drop such messages without a word)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.common import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmed.coordinator.grid import ObservedGrid
from fedmed.coordinator.recorder import RunRecorder
from fedmed.runs.compose import compose_config


@pytest.fixture(autouse=True)
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built inside a run, as the ServerApp does."""
    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


class FakeGrid:
    """Flower's Grid surface the coordinator uses: push gives ids, pull returns ready replies.

    ``silent`` nodes take their message and never answer; ``error`` nodes are reported lost
    by the SuperLink; the rest answer, each after ``delay_polls`` pulls.
    """

    def __init__(self, silent: set[int] = frozenset(), error: set[int] = frozenset(),
                 delay_polls: int = 0) -> None:  # fmt: skip
        self.silent, self.error, self.delay_polls = set(silent), set(error), delay_polls
        self.pushed: dict[str, Message] = {}
        self.polls = 0

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = f"m{len(self.pushed)}"
            self.pushed[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        self.polls += 1
        if self.polls <= self.delay_polls:
            return []
        replies = []
        for message_id in message_ids:
            message = self.pushed[message_id]
            node = message.metadata.dst_node_id
            if node in self.error:
                replies.append(Message(Error(code=5, reason="node unavailable"), reply_to=message))
            elif node not in self.silent:
                content = RecordDict({"fitres.metrics": ConfigRecord({"site": f"site{node}"})})
                replies.append(Message(content, reply_to=message))
        return replies


def _train(node: int, server_round: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type="train", group_id=str(server_round))


def _recorder(tmp_path: Path, sites: int = 3) -> RunRecorder:
    return RunRecorder(compose_config(["dataset=heart"]), tmp_path, sites)


def test_a_site_that_never_replies_is_recorded_by_name_round_and_stage(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    inner = FakeGrid()
    grid = ObservedGrid(inner, recorder, round_offset=2, reply_poll_s=0.001)

    first = grid.send_and_receive([_train(n, 1) for n in (1, 2, 3)], timeout=30.0)
    assert len(first) == 3 and recorder.failures == []
    assert grid.site_name(3) == "site3" and grid.site_name(9) == "node 9"

    inner.silent = {3}
    second = grid.send_and_receive([_train(n, 2) for n in (1, 2, 3)], timeout=0.05)
    assert len(second) == 2
    [failure] = recorder.failures
    assert (failure.site, failure.round, failure.stage) == ("site3", 4, "train")
    assert "no reply within federation.round_timeout (0.05 s)" in failure.error


def test_an_error_reply_from_the_superlink_counts_as_an_answer(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path, 2)
    grid = ObservedGrid(FakeGrid(error={7}), recorder)
    replies = grid.send_and_receive([_train(7, 1)], timeout=5.0)
    assert len(replies) == 1 and replies[0].has_error() and recorder.failures == []


def test_replies_are_collected_as_soon_as_they_arrive(tmp_path: Path) -> None:
    """The coordinator polls on its own short interval (Flower's deployment grid sleeps 3 s)."""
    inner = FakeGrid(delay_polls=4)
    grid = ObservedGrid(inner, _recorder(tmp_path), reply_poll_s=0.01)
    started = time.monotonic()
    assert len(grid.send_and_receive([_train(n, 1) for n in (1, 2)], timeout=60.0)) == 2
    assert inner.polls == 5 and time.monotonic() - started < 1.0


def test_a_plain_round_without_a_timeout_waits_at_most_the_round_timeout(tmp_path: Path) -> None:
    """Flower's plain fit and evaluate workflows call send_and_receive with no timeout."""
    recorder = _recorder(tmp_path)
    grid = ObservedGrid(FakeGrid(silent={1}), recorder, round_timeout=0.2, reply_poll_s=0.01)
    started = time.monotonic()
    assert grid.send_and_receive([_train(1, 1)]) == []
    assert 0.2 <= time.monotonic() - started < 2.0
    grid.send_and_receive([_train(1, 2)], timeout=0.05)  # a SecAgg+ stage's own timeout stays
    assert [f.error.split("(")[1] for f in recorder.failures] == ["0.2 s)", "0.05 s)"]


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
    recorder = _recorder(tmp_path, 4)
    inner = ConnectingGrid(connect_every=3, total=4)
    assert ObservedGrid(inner, recorder).wait_for_sites(4, timeout=30.0) == 4
    assert inner.polls == 12


def test_a_site_that_never_connects_delays_round_one_only_by_the_connect_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = _recorder(tmp_path, 4)
    grid = ObservedGrid(ConnectingGrid(connect_every=1, total=3), recorder)
    with caplog.at_level("INFO", logger="fedmed.coordinator.grid"):
        assert grid.wait_for_sites(4, timeout=0.3) == 3
    assert "only 3 of 4 sites connected after federation.connect_timeout=0.3 s" in caplog.text


class ClaimingGrid(FakeGrid):
    """Connected nodes 1-4; each reply claims ``claims[node]`` (default: its own name), as a
    site field or, for nodes in ``refusing``, as a SiteError."""

    def __init__(self, claims: dict[int, str], refusing: set[int] = frozenset()) -> None:
        super().__init__()
        self.claims, self.refusing = claims, set(refusing)

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3, 4]

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = []
        for message_id in message_ids:
            message = self.pushed[message_id]
            node = message.metadata.dst_node_id
            site = self.claims.get(node, f"site{node}")
            if node in self.refusing:
                error = Error(code=0, reason=f"SiteError: site '{site}': refuses the run: x")
                replies.append(Message(error, reply_to=message))
            else:
                content = RecordDict({"fedmed.site": ConfigRecord({"site": site})})
                replies.append(Message(content, reply_to=message))
        return replies


REGISTRY = {1: "site1", 2: "site2", 3: "site3", 9: "site9"}


def test_with_a_registry_only_registered_nodes_are_sampled_and_named_by_it(
    tmp_path: Path,
) -> None:
    grid = ObservedGrid(ClaimingGrid({}), _recorder(tmp_path), registry=REGISTRY)
    assert grid.get_node_ids() == [1, 2, 3]  # node 4 is connected but not registered
    assert grid.wait_for_sites(3, timeout=0.1) == 3
    assert grid.site_name(9) == "site9" and grid.site_name(4) == "node 4"
    assert len(grid.send_and_receive([_train(n, 1) for n in (1, 2, 3)], timeout=5.0)) == 3


def test_a_node_claiming_another_sites_name_is_refused_recorded_and_not_sampled_again(
    tmp_path: Path,
) -> None:
    recorder = _recorder(tmp_path)
    inner = ClaimingGrid({3: "site1"})
    grid = ObservedGrid(inner, recorder, round_offset=1, registry=REGISTRY)
    replies = grid.send_and_receive([_train(n, 1) for n in (1, 2, 3)], timeout=5.0)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    [failure] = recorder.failures  # refused, not "no reply"
    assert (failure.site, failure.round, failure.stage) == ("site3", 2, "train")
    assert failure.error.startswith("node 3 is registered as 'site3' but claims to be 'site1'")
    assert grid.get_node_ids() == [1, 2]
    assert grid.site_name(3) == "site3"  # the registry's name, whatever it claims


def test_a_refusal_sent_under_another_sites_name_is_refused_too(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    inner = ClaimingGrid({2: "site1"}, refusing={1, 2})
    grid = ObservedGrid(inner, recorder, registry=REGISTRY)
    replies = grid.send_and_receive([_train(n, 1) for n in (1, 2)], timeout=5.0)
    assert [r.metadata.src_node_id for r in replies] == [1]  # site1's own refusal stands
    assert replies[0].has_error()
    [failure] = recorder.failures
    assert failure.site == "site2" and "claims to be 'site1'" in failure.error


def test_a_registered_node_that_is_no_site_of_the_run_is_never_sampled_and_noted_once(
    tmp_path: Path,
) -> None:
    """E.g. a node registered as "rogue" that claims to be VA: not even SecAgg+'s setup."""
    recorder = _recorder(tmp_path)
    grid = ObservedGrid(
        ClaimingGrid({3: "site1"}), recorder, registry=REGISTRY, run_sites=["site1", "site2"]
    )
    assert grid.get_node_ids() == [1, 2]
    assert grid.get_node_ids() == [1, 2]
    [noted] = recorder.extra["unsampled_nodes"]
    assert noted["node"] == 3 and noted["registered_as"] == "site3"
    assert noted["reason"] == "not one of this run's sites (site1, site2); never sampled"
    assert recorder.failures == []
