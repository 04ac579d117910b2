"""Where Flower's simulation engine runs: a Ray of the run's own, or an existing Ray cluster.

A run joins a cluster at ``engine.address`` or, when that is null, at ``RAY_ADDRESS`` (Ray's
own convention; the config wins, as an explicit ``ray.init(address=...)`` wins in Ray). It
never joins a Ray it happens to find on the machine: without an address it starts its own.
Whatever the engine, a site's work that a timed-out round abandoned is ended once the
coordinator is done, touching only what the run itself started or owns.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from fedmed.config.schema import EngineConfig
from fedmed.errors import ConfigError, FedMedError
from fedmed.kits.server import host_port
from fedmed.process_tree import command_line, descendants

log = logging.getLogger(__name__)

RAY_ADDRESS = "RAY_ADDRESS"
# ray.init's address for "start a new Ray": with no address at all, Ray would join the last
# cluster `ray start` recorded on this machine (/tmp/ray/ray_current_cluster).
LOCAL = "local"
# Seconds to wait for the cluster's head to answer: ray.init itself retries a dead address
# for minutes (20 tries of 35 s each), and an address that is not Ray's for ever.
PROBE_TIMEOUT_S = 10.0

# When the coordinator has finished, Flower's engine stops within about a second unless a
# site is still working on a message (a round that timed out); such work is ended after
# ABANDONED_WORK_GRACE_S (checked again each second, REAP_ATTEMPTS times).
ABANDONED_WORK_GRACE_S = 2.0
REAP_ATTEMPTS = 30
SITE_ACTOR = "ClientAppActor"  # Flower's Ray actor class that runs a site's ClientApp
BUSY_WORKER_TITLE = f"ray::{SITE_ACTOR}.run".encode()  # Ray's title while it runs a message


def prepare_engine() -> None:
    """Keep Flower's INFO chatter out of the progress output (FEDMED_VERBOSE=1 shows it), and
    set Ray up for CPU-only workers."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB migrations
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # under Hydra every Flower line would print twice
    if not os.environ.get("FEDMED_VERBOSE"):
        flwr_logger.setLevel(logging.CRITICAL)  # site failures are reported by the recorder
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def cluster_address(engine: EngineConfig) -> str | None:
    """The Ray cluster the run joins (checked to answer), or None to start a Ray of its own."""
    if engine.address is not None:
        where, address = "engine.address", engine.address
    elif os.environ.get(RAY_ADDRESS):
        where, address = RAY_ADDRESS, os.environ[RAY_ADDRESS]
    else:
        return None
    if "://" in address:
        raise FedMedError(
            f"{where}={address!r}: Ray Client addresses are not supported; run fedmed on a "
            "node of the cluster and give the head's HOST:PORT (as `ray start --head` prints)"
        )
    host_port(address, where)
    check_cluster(address, where)
    return address


def check_cluster(address: str, where: str) -> None:
    """Ask the cluster's head (its GCS) for the cluster's id, so that a wrong address fails in
    seconds, naming ``where``, instead of hanging in ``ray.init``."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            request = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]
            stub.GetClusterId(request, timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as err:
            code = err.code()  # a failed call's error is also its grpc.Call
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return  # a Ray head that wants a token (RAY_AUTH_TOKEN): ray.init sends it
            detail = " ".join(str(err.details()).split())[:200]  # one line
            raise FedMedError(
                f"{where}={address}: no Ray cluster answers there ({code.name}: {detail}); "
                "start one with `ray start --head --port=PORT` and give HOST:PORT of its head"
            ) from None


def backend_config(engine: EngineConfig, address: str | None) -> dict[str, Any]:
    """Flower's Ray backend settings: each site's actor reserves ``num_cpus_per_site``; a
    worker process that dies (killed, out of memory) is restarted by Ray, and the message it
    held fails and is recorded, never retried (a retried fit would train and spend privacy
    twice)."""
    cpus = engine.num_cpus_per_site
    if address is None and cpus > (os.cpu_count() or 1):  # a local Ray would wait for ever
        raise ConfigError(
            "engine.num_cpus_per_site", cpus, f"at most this machine's {os.cpu_count()} CPUs"
        )
    return {
        "client_resources": {
            "num_cpus": cpus,
            "num_gpus": 0.0,
            "max_restarts": -1,
            "max_task_retries": 0,
        },
        "init_args": {
            "address": address or LOCAL,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        },
    }


def _busy_site_workers(root: int) -> list[int]:
    """This process's own Ray workers that are running a site's message (Ray titles a
    worker ``ray::ClientAppActor.run`` while the actor runs one, ``ray::ClientAppActor``
    when idle). Only descendants of ``root``: the Ray instance this run started."""
    return [pid for pid in descendants(root) if command_line(pid).startswith(BUSY_WORKER_TITLE)]


def _end_busy_workers(engine_done: threading.Event) -> int:
    """A Ray of the run's own: kill its busy site workers like a crash (a site's ledger
    survives a crash: each entry is durable before its update leaves)."""
    busy = _busy_site_workers(os.getpid())
    if engine_done.is_set():  # stopped meanwhile: the next run's workers are not ours
        return 0
    for pid in busy:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(busy)


def _end_site_actors(engine_done: threading.Event) -> int:
    """A cluster: its processes are not the run's to kill, but the site actors are (this
    driver owns them), wherever the cluster placed them. Flower's actor pool keeps their
    handles to itself, so they are found among this process's objects; by now the engine
    sends them nothing more, so idle ones go too."""
    import ray

    actors = [
        handle
        for handle in gc.get_objects()
        if isinstance(handle, ray.actor.ActorHandle)
        and handle._ray_actor_creation_function_descriptor.class_name == SITE_ACTOR
    ]
    if engine_done.is_set():  # stopped meanwhile: Flower ended them itself
        return 0
    for handle in actors:
        with contextlib.suppress(Exception):  # already gone (ended, or its node lost)
            ray.kill(handle, no_restart=True)
    return len(actors)


def _reap(
    engine_done: threading.Event, end_work: Callable[[threading.Event], int], what: str
) -> None:
    """After a grace period, end the work still running until Flower's engine has stopped."""
    if engine_done.wait(ABANDONED_WORK_GRACE_S):
        return
    for _ in range(REAP_ATTEMPTS):
        if ended := end_work(engine_done):
            log.info(
                f"simulation: ended {ended} {what} still running work of a round that timed "
                "out (federation.round_timeout)"
            )
        if engine_done.wait(1.0):
            return


def end_abandoned_work(engine_done: threading.Event, address: str | None) -> None:
    """Once the coordinator is done, a site message still running belongs to a round that
    timed out. Flower's Ray engine waits for each one without a timeout before it stops
    (``ray.get``), so a site stuck in its work would keep the process (and its workers)
    alive. Ending that work makes Ray fail the message, and the engine stops."""
    if address is not None:
        reap = (engine_done, _end_site_actors, "site actor(s) on the Ray cluster")
    elif sys.platform.startswith("linux"):  # /proc; elsewhere the engine waits for the sites
        reap = (engine_done, _end_busy_workers, "site worker(s)")
    else:
        return
    threading.Thread(target=_reap, args=reap, daemon=True).start()
