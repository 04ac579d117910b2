"""The coordinator's view of the Grid: which sites are connected, which site is behind each
node, and who never replied.

Flower's workflows drop a message that got no reply before the timeout without a word, and
its plain (non-SecAgg+) rounds wait with no timeout at all. A hospital whose SuperNode crashed
after taking its work and came back under the same node id is such a case: the SuperLink never
reports that reply as lost. This proxy bounds every wait by ``federation.round_timeout`` and
records every unanswered message as the site's failure for that round and stage.

It also waits for replies itself, over the Grid's public ``push_messages`` / ``pull_messages``:
Flower's own loops sleep between polls (0.1 s in simulation, a hard-coded 3 s in deployment),
and every exchange of every round pays that sleep whatever the sites' speed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.common import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedmed.coordinator.recorder import RunRecorder

# How often the coordinator looks for newly connected sites while it waits for them.
CONNECT_POLL_S = 0.05
# How often it asks for replies: in simulation a poll is an in-process lookup; in deployment
# it is one request to the SuperLink.
SIMULATION_REPLY_POLL_S = 0.01
DEPLOYMENT_REPLY_POLL_S = 0.25


class ObservedGrid:
    """A Grid proxy that learns site names from replies and records the missing replies."""

    def __init__(
        self,
        grid: Any,
        recorder: RunRecorder,
        round_offset: int = 0,
        round_timeout: float | None = None,
        reply_poll_s: float = DEPLOYMENT_REPLY_POLL_S,
    ) -> None:
        self._grid = grid
        self._recorder = recorder
        self._round_offset = round_offset
        self._round_timeout = round_timeout
        self._reply_poll_s = reply_poll_s
        self.node_names: dict[int, str] = {}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._grid, attr)

    def site_name(self, node: int) -> str:
        return self.node_names.get(node) or f"node {node}"

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send, then collect replies until all have come or the timeout has passed.

        Flower's plain rounds pass no timeout: ``federation.round_timeout`` bounds them.
        """
        if timeout is None:
            timeout = self._round_timeout
        sent = list(messages)
        replies = self._collect_replies(set(self._grid.push_messages(sent)), timeout)
        for reply in replies:
            if reply.has_content():
                for record in reply.content.config_records.values():
                    if "site" in record:
                        self.node_names[reply.metadata.src_node_id] = str(record["site"])
        # Error replies (node unavailable) come from the SuperLink: match by message id.
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        for message in sent:  # the Grid gave each sent message its id
            if message.metadata.message_id not in answered:
                self._recorder.record_no_reply(
                    int(message.metadata.group_id or 0) + self._round_offset,
                    self.site_name(message.metadata.dst_node_id),
                    _stage(message),
                    timeout,
                )
        return replies

    def _collect_replies(self, pending: set[str], timeout: float | None) -> list[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self._grid.pull_messages(list(pending)))
            replies.extend(pulled)
            pending -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._reply_poll_s)
        return replies

    def wait_for_sites(self, expected: int, timeout: float) -> int:
        """Wait until ``expected`` sites are connected, at most ``timeout`` seconds.

        Flower's sampler sizes a round by the sites connected at that moment; in simulation
        the nodes register in another thread while the coordinator starts, so without this
        wait round 1 could train only the first few. Returns how many are connected.
        """
        deadline = time.monotonic() + timeout
        while (connected := len(list(self._grid.get_node_ids()))) < expected:
            if time.monotonic() >= deadline:
                print(
                    f"only {connected} of {expected} sites connected after "
                    f"federation.connect_timeout={timeout:g} s; starting with those",
                    flush=True,
                )
                break
            time.sleep(CONNECT_POLL_S)
        return connected


def _stage(message: Message) -> str:
    """The SecAgg+ stage a message asks for, else its type (train, evaluate)."""
    secagg = message.content.config_records.get(RECORD_KEY_CONFIGS)
    if secagg is not None and Key.STAGE in secagg:
        return str(secagg[Key.STAGE])
    return message.metadata.message_type
