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

In deployment it is given the site registry (node id -> site, from the key each node
authenticated with; coordinator/registry.py): rounds sample only registered nodes whose
registered name is one of the run's sites, sites are named by the registry, and a node whose
reply claims another site's name is refused, recorded and never sampled again. (A node that is
no site of the run is never sampled: in SecAgg+ even a node refused at setup already holds a
place in every other site's share graph, and one more dropout then fails the round.)
Simulation has no registry and learns the names from the replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.common import Error, Message

from fedmed.coordinator.recorder import Failure, RunRecorder, site_error
from fedmed.protocol import RECORD_KEY_CONFIGS, SITE_KEY, Key

log = logging.getLogger(__name__)

# How often the coordinator looks for newly connected sites while it waits for them.
CONNECT_POLL_S = 0.05
# How often it asks for replies: in simulation a poll is an in-process lookup; in deployment
# it is one request to the SuperLink.
SIMULATION_REPLY_POLL_S = 0.01
DEPLOYMENT_REPLY_POLL_S = 0.25


class ObservedGrid:
    """A Grid proxy that names the sites (from the registry, else from their replies),
    records the missing replies and refuses replies from a node posing as another site."""

    def __init__(
        self,
        grid: Any,
        recorder: RunRecorder,
        round_offset: int = 0,
        round_timeout: float | None = None,
        reply_poll_s: float = DEPLOYMENT_REPLY_POLL_S,
        registry: dict[int, str] | None = None,
        run_sites: list[str] | None = None,
    ) -> None:
        self._grid = grid
        self._recorder = recorder
        self._round_offset = round_offset
        self._round_timeout = round_timeout
        self._reply_poll_s = reply_poll_s
        self.registry = registry
        self.node_names: dict[int, str] = dict(registry or {})
        self.refused: set[int] = set()
        self.run_sites = run_sites
        self._noted: set[int] = set()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._grid, attr)

    def site_name(self, node: int) -> str:
        return self.node_names.get(node) or f"node {node}"

    def get_node_ids(self) -> list[int]:
        """The connected nodes a round may sample: with a registry, the registered ones that
        have not been refused (Flower's sampler and wait_for_sites both ask here)."""
        nodes = list(self._grid.get_node_ids())
        if self.registry is None:
            return nodes
        registered = [n for n in nodes if n in self.registry and n not in self.refused]
        if self.run_sites is None:
            return registered
        for node in registered:
            if self.registry[node] not in self.run_sites and node not in self._noted:
                self._note_outsider(node)
        return [n for n in registered if self.registry[n] in self.run_sites]

    def _note_outsider(self, node: int) -> None:
        """A connected, registered node that is no site of this run: said once, never sampled."""
        assert self.registry is not None and self.run_sites is not None
        self._noted.add(node)
        site = self.registry[node]
        reason = f"not one of this run's sites ({', '.join(self.run_sites)}); never sampled"
        self._recorder.extra.setdefault("unsampled_nodes", []).append(
            {"node": node, "registered_as": site, "reason": reason}
        )
        log.info(f"node {node} (registered as '{site}') is {reason}")

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
        if self.registry is None:
            self._learn_names(replies)
        # Error replies (node unavailable) come from the SuperLink: match by message id.
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        by_id = {message.metadata.message_id: message for message in sent}
        if self.registry is not None:
            replies = [r for r in replies if self._admit(r, by_id[r.metadata.reply_to_message_id])]
        for reply in replies:
            message = by_id[reply.metadata.reply_to_message_id]
            if reply.has_error():
                self._name_error(reply, message)
            else:
                self._recorder.record_reply(
                    int(message.metadata.group_id or 0) + self._round_offset,
                    self.site_name(reply.metadata.src_node_id),
                    _stage(message),
                    reply.content,
                )
        for message in sent:  # the Grid gave each sent message its id
            if message.metadata.message_id not in answered:
                self._recorder.record_no_reply(
                    int(message.metadata.group_id or 0) + self._round_offset,
                    self.site_name(message.metadata.dst_node_id),
                    _stage(message),
                    timeout,
                )
        return replies

    def _learn_names(self, replies: list[Message]) -> None:
        for reply in replies:
            # A site's own refusal names it too (a site that fails at its first message
            # would otherwise stay "node N" in the dropouts of the whole run).
            claimed = _claimed_site(reply)
            if claimed is not None:
                self.node_names[reply.metadata.src_node_id] = claimed

    def _name_error(self, reply: Message, message: Message) -> None:
        """Put the site's name into an error reply that lacks it.

        The SuperLink's own errors (node unavailable, reply expired) and a crashed simulation
        worker's carry no site name, and the SuperLink's come from node 0: Flower's workflows
        keep only the text, so without this the run would record the failure as "unknown".
        """
        site, short = site_error(reply.error.reason or "")
        if site == "unknown":
            name = self.site_name(message.metadata.dst_node_id)
            reply.error = Error(reply.error.code, f"site '{name}': {short}")

    def _admit(self, reply: Message, message: Message) -> bool:
        """Whether a reply comes from the site the node is registered as; else record it."""
        assert self.registry is not None
        node = message.metadata.dst_node_id
        registered = self.registry.get(node)
        claimed = _claimed_site(reply)
        if registered is not None and claimed in (None, registered):
            return True
        if registered is None:
            problem = f"node {node} is not in the site registry"
        else:
            problem = f"node {node} is registered as '{registered}' but claims to be '{claimed}'"
        self.refused.add(node)
        server_round = int(message.metadata.group_id or 0) + self._round_offset
        stage = _stage(message)
        error = f"{problem}; its replies are refused and it is not sampled again"
        self._recorder.failures.append(
            Failure(registered or f"node {node}", server_round, stage, error)
        )
        log.info(f"round {server_round:>3} | {stage} refused: {error}")
        return False

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
        while (connected := len(self.get_node_ids())) < expected:
            if time.monotonic() >= deadline:
                log.info(
                    f"only {connected} of {expected} sites connected after "
                    f"federation.connect_timeout={timeout:g} s; starting with those",
                )
                break
            time.sleep(CONNECT_POLL_S)
        return connected


def _claimed_site(reply: Message) -> str | None:
    """The site a reply says it comes from: its ``site`` field, or the SiteError it carries."""
    if reply.has_error():
        site, _ = site_error(reply.error.reason or "")
        return None if site == "unknown" else site
    for record in reply.content.config_records.values():
        if SITE_KEY in record:
            return str(record[SITE_KEY])
    return None


def _stage(message: Message) -> str:
    """The SecAgg+ stage a message asks for, else its type (train, evaluate)."""
    secagg = message.content.config_records.get(RECORD_KEY_CONFIGS)
    if secagg is not None and Key.STAGE in secagg:
        return str(secagg[Key.STAGE])
    return message.metadata.message_type
