"""The site's gate: a Flower mod in front of the site and of ``secaggplus_mod``.

Every message passes through it. First the site identifies itself, which checks the run
against the site's kit (``fedmed.site.policy.check_run``): a run that changes anything the
kit owns is refused at its earliest message (a plain training request, the SecAgg+ setup
stage, an evaluation), before anything is trained or recorded, and the refusal names the
site. Then, for training requests: a SecAgg+ request goes on to Flower's
``secaggplus_mod``, after the gate has noted the protocol's range settings so the site can
check its update against them before masking (SecAgg+ would clip silently). A plain request
is refused when the site's kit requires secure aggregation. Replies carry the site's name so
the coordinator can say which site dropped out at which stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import MessageType

from fedmed.errors import SiteError
from fedmed.protocol import RECORD_KEY_CONFIGS, SITE_KEY, SITE_RECORD, Key, Stage

# The site's own state between SecAgg+ stages (in its Context, never sent).
SECURE_ROUND_RECORD = "fedmed.secure_round"


@dataclass(frozen=True)
class SecureRound:
    """The range settings of the SecAgg+ round a training request belongs to."""

    clipping_range: float
    quantization_range: int
    max_weight: float

    def check_update(self, site: str, update: list[np.ndarray], num_examples: int) -> None:
        """Refuse an update SecAgg+ would clip: every value x num_examples / max_weight must
        lie in [-clipping_range, clipping_range] (and be finite)."""
        ratio = round(num_examples / self.max_weight * self.quantization_range)
        ratio_q = ratio / self.quantization_range
        peak = max((float(np.abs(a).max()) for a in update if a.size), default=0.0) * ratio_q
        if not peak <= self.clipping_range:
            raise SiteError(
                site,
                f"update value {peak:.4g} (after weighting by num_examples={num_examples} / "
                f"max_weight={self.max_weight:g}) is outside secagg.clipping_range="
                f"{self.clipping_range:g}; SecAgg+ would clip it silently, so the site sends "
                "nothing this round (raise secagg.clipping_range)",
            )


def secure_round(context: Context) -> SecureRound | None:
    """The SecAgg+ round being trained in this context, or None for a plain request."""
    record = context.state.config_records.get(SECURE_ROUND_RECORD)
    if record is None or not record.get("collecting", False):
        return None
    return SecureRound(
        cast(float, record["clipping_range"]),
        cast(int, record["quantization_range"]),
        cast(float, record["max_weight"]),
    )


@dataclass(frozen=True)
class SiteIdentity:
    """What the gate needs to know about the site it guards."""

    name: str
    requires_secure_aggregation: bool
    faults: tuple[tuple[str, int], ...] = ()  # (stage, round) pairs to fail at (testing)


def make_secure_aggregation_mod(identify: Callable[[Context], SiteIdentity]) -> Mod:
    """The gate; ``identify`` says which site this ClientApp serves in a given context, and
    raises the site's SiteError when the site refuses the run."""

    def secure_aggregation_mod(
        msg: Message, ctxt: Context, call_next: ClientAppCallable
    ) -> Message:
        site = identify(ctxt)  # every message: a refused run gets nothing from the site
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        server_round = int(msg.metadata.group_id or 0)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            if site.requires_secure_aggregation:
                raise SiteError(
                    site.name,
                    "refuses a plain training request: its kit requires secure aggregation "
                    "(require_secure_aggregation: true); run with secagg=secaggplus",
                )
            _inject_fault(site, "fit", server_round)
            return call_next(msg, ctxt)
        stage = str(configs.get(Key.STAGE, ""))
        _inject_fault(site, stage, server_round)
        if stage == Stage.SETUP:
            ctxt.state.config_records[SECURE_ROUND_RECORD] = ConfigRecord(
                {
                    "clipping_range": cast(float, configs[Key.CLIPPING_RANGE]),
                    "quantization_range": cast(int, configs[Key.TARGET_RANGE]),
                    "max_weight": cast(float, configs[Key.MAX_WEIGHT]),
                    "collecting": False,
                }
            )
        record = ctxt.state.config_records.get(SECURE_ROUND_RECORD)
        collecting = stage == Stage.COLLECT_MASKED_VECTORS and record is not None
        if collecting:
            record["collecting"] = True  # type: ignore[index]
        try:
            reply = secaggplus_mod(msg, ctxt, call_next)
        finally:
            if collecting:
                record["collecting"] = False  # type: ignore[index]
        if not reply.has_error():
            reply.content.config_records[SITE_RECORD] = ConfigRecord({SITE_KEY: site.name})
        return reply

    return secure_aggregation_mod


def _inject_fault(site: SiteIdentity, stage: str, server_round: int) -> None:
    if (stage, server_round) in site.faults:
        raise SiteError(site.name, f"injected fault: dropped out at stage '{stage}'")
