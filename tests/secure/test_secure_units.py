"""SecAgg+ settings checks, the site's range check and its secure-aggregation gate."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config.schema import FedMedConfig
from fedmed.coordinator.strategies import sampling_fraction
from fedmed.errors import FedMedError, SiteError
from fedmed.secure.params import resolve_secagg
from fedmed.site.gate import (
    SECURE_ROUND_RECORD,
    SecureRound,
    SiteIdentity,
    make_secure_aggregation_mod,
    secure_round,
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["secagg.num_shares=5"], r"secagg\.num_shares=5.*at most the 4 sites sampled"),
        (
            ["secagg.num_shares=4", "secagg.reconstruction_threshold=5"],
            r"secagg\.reconstruction_threshold=5.*at most secagg\.num_shares=4",
        ),
        (
            ["secagg.quantization_range=1073741824"],
            r"secagg\.quantization_range=1073741824.*< 2\^32 / 4 sampled sites.*overflow",
        ),
        (["federation.fraction=0.5"], r"federation\.min_sites=2.*at least 3 sites per round"),
        (["secagg.clipping_range=0"], r"secagg\.clipping_range=0\.0.*> 0"),
        (["secagg.num_shares=2"], r"secagg\.num_shares=2.*>= 3"),
        (["inject_faults=[va:nowhere:1]"], r"inject_faults='va:nowhere:1'.*SITE:STAGE:ROUND"),
    ],
)
def test_unworkable_secagg_settings_are_refused_naming_the_key(
    compose: Callable[..., FedMedConfig], overrides: list[str], message: str
) -> None:
    with pytest.raises(FedMedError, match=message):
        compose("dataset=heart", "secagg=secaggplus", *overrides)


def test_defaults_use_every_sampled_site_and_a_two_thirds_threshold(
    compose: Callable[..., FedMedConfig],
) -> None:
    cfg = compose("dataset=breast_cancer", "federation.num_sites=10", "secagg=secaggplus")
    params = resolve_secagg(cfg, 10)
    assert params is not None
    assert (params.num_shares, params.reconstruction_threshold) == (10, 7)
    assert resolve_secagg(compose("dataset=heart"), 4) is None
    # The error bound: k sites' stochastic rounding, divided by the total weight ratio.
    step = 2 * 8.0 / 2**22
    assert params.max_quantization_error([100, 300]) == pytest.approx(2 * step * 1000 / 400)


def test_an_update_secagg_would_clip_is_refused_with_the_value() -> None:
    secure = SecureRound(clipping_range=1.0, quantization_range=2**22, max_weight=100.0)
    secure.check_update("va", [np.full(3, 1.9, dtype=np.float32)], num_examples=50)  # 0.95
    with pytest.raises(SiteError, match=r"site 'va': update value 2\.5 .*num_examples=50.*"
                       r"clipping_range=1; SecAgg\+ would clip it silently"):  # fmt: skip
        secure.check_update("va", [np.zeros(2), np.array([-5.0])], num_examples=50)
    with pytest.raises(SiteError, match="update value nan"):
        secure.check_update("va", [np.array([np.nan])], num_examples=50)


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built as a ServerApp builds them: inside a run."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _context(node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def _train_message(configs: dict | None) -> Message:
    content = RecordDict()
    if configs is not None:
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN, group_id="3")


def test_a_site_that_requires_secure_aggregation_refuses_plain_training() -> None:
    called = []

    def app(msg: Message, ctxt: Context) -> Message:
        called.append(msg)
        return Message(RecordDict(), reply_to=msg)

    strict = make_secure_aggregation_mod(lambda _c: SiteIdentity("switzerland", True))
    with pytest.raises(SiteError, match=r"site 'switzerland': refuses a plain training request"):
        strict(_train_message(None), _context(), app)
    assert called == []  # the site never trained
    relaxed = make_secure_aggregation_mod(lambda _c: SiteIdentity("va", False))
    relaxed(_train_message(None), _context(), app)
    assert len(called) == 1


def test_the_gate_records_the_round_range_and_injects_faults_by_stage() -> None:
    mod = make_secure_aggregation_mod(
        lambda _c: SiteIdentity("va", False, faults=(("share_keys", 3),))
    )
    ctxt = _context()
    setup = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: 4,
        Key.SHARE_NUMBER: 4,
        Key.THRESHOLD: 3,
        Key.CLIPPING_RANGE: 2.5,
        Key.TARGET_RANGE: 1024,
        Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: 300.0,
    }
    reply = mod(_train_message(setup), ctxt, lambda m, c: Message(RecordDict(), reply_to=m))
    assert reply.content.config_records["fedmed.site"]["site"] == "va"
    assert SECURE_ROUND_RECORD in ctxt.state.config_records
    assert secure_round(ctxt) is None  # only while the site trains inside SecAgg+
    with pytest.raises(SiteError, match="injected fault: dropped out at stage 'share_keys'"):
        mod(_train_message({Key.STAGE: Stage.SHARE_KEYS}), ctxt, lambda m, c: m)


def test_sampling_takes_the_planned_sites_or_fewer_when_some_are_down() -> None:
    for total in (3, 4, 10, 101, 1000):
        for per_round in range(1, total + 1):
            fraction = sampling_fraction(per_round, total)
            assert int(total * fraction) == per_round
            assert all(int(up * fraction) <= up for up in range(1, total + 1))
