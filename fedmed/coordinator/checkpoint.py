"""The coordinator's checkpoint: everything needed to continue a run after a crash.

Written after every completed round (atomically: a temporary file, fsync, rename), holding
the global model, the server optimiser's state (FedAdam/FedYogi moments), the round number,
the RNG state Flower samples sites with, and what the run recorded so far. The sites' privacy
ledgers are theirs and persist on their own.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from fedmed.coordinator.recorder import RunRecorder
from fedmed.errors import FedMedError

CHECKPOINT_FILE = "checkpoint.pkl"
# Server-optimiser state of Flower's legacy FedOpt family (FedAdam, FedYogi, FedAdagrad).
STRATEGY_STATE = ("current_weights", "m_t", "v_t")
RECORDER_STATE = ("history", "rounds_ended", "failures", "site_rows", "sites")


@dataclass
class Checkpoint:
    """The state after ``round`` completed rounds."""

    round: int
    global_weights: list[np.ndarray]
    strategy_state: dict[str, Any]
    recorder_state: dict[str, Any]
    python_random: Any
    numpy_random: Any
    averaged_weights: list[np.ndarray] | None = None  # strategy.average_decay's average


def capture(
    server_round: int,
    weights: list[np.ndarray],
    inner: Strategy,
    recorder: RunRecorder,
    averaged: list[np.ndarray] | None = None,
) -> Checkpoint:
    return Checkpoint(
        round=server_round,
        global_weights=[w.copy() for w in weights],
        strategy_state={k: getattr(inner, k) for k in STRATEGY_STATE if hasattr(inner, k)},
        recorder_state={
            **{k: getattr(recorder, k) for k in RECORDER_STATE},
            "privacy": (recorder.privacy.spends, recorder.privacy.sites),
            "secure": recorder.secure,
        },
        python_random=random.getstate(),
        numpy_random=np.random.get_state(),
        averaged_weights=None if averaged is None else [w.copy() for w in averaged],
    )


def save(checkpoint: Checkpoint, output_dir: Path) -> None:
    """Replace the run's checkpoint atomically, so a crash leaves the old or the new one."""
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / CHECKPOINT_FILE
    temporary = target.with_suffix(".tmp")
    with temporary.open("wb") as handle:
        pickle.dump(checkpoint, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)


def load(output_dir: Path) -> Checkpoint:
    path = output_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise FedMedError(f"resume=true: no {CHECKPOINT_FILE} in {output_dir} to resume from")
    with path.open("rb") as handle:
        checkpoint = pickle.load(handle)  # our own file, written by save() above
    if not isinstance(checkpoint, Checkpoint):
        raise FedMedError(f"{path}: not a fedmed checkpoint")
    return checkpoint


def restore(checkpoint: Checkpoint, inner: Strategy, recorder: RunRecorder) -> None:
    """Put the strategy, the recorder and the RNGs back where the checkpoint left them."""
    for key, value in checkpoint.strategy_state.items():
        setattr(inner, key, value)
    state = checkpoint.recorder_state
    for key in RECORDER_STATE:
        setattr(recorder, key, state[key])
    recorder.privacy.spends, recorder.privacy.sites = state["privacy"]
    recorder.secure = state["secure"]
    random.setstate(checkpoint.python_random)
    np.random.set_state(checkpoint.numpy_random)
