"""kdray's connection to Ray: join the cluster at ``RAY_ADDRESS`` or start a local instance on loopback.

Below everything that uses Ray (the data stream, Ray Train stages, searches), so each connects the same way
without importing the others.
"""

from __future__ import annotations

import os
from typing import Any

# Environment variables kdray's Ray job sets for its own actors (the Train controller among them); the
# user's own setting of a variable wins.
JOB_ENV = {
    # Train V2 holds at most one unread report per worker and its controller reads them every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so each per-epoch report could block a worker for
    # up to 2 s: on digits that tripled a 15-epoch run (27 s of reports for 6 s of training). A quarter
    # second costs the controller a few polls a second.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Ray 2.60 starts a PreemptionWatcher actor (one more Python process, about 2 s of CPU) with every worker
    # group, to hand node-drain notices to a training function that reads ray.train.get_preemption_info().
    # kdray's does not: it checkpoints every epoch and resumes after a lost node like after any failure.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def ray_init_options() -> dict[str, Any]:
    """What kdray's Ray job needs besides the address: environment variables for Ray's own actors."""
    env = {key: value for key, value in JOB_ENV.items() if key not in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch: "0" keeps an instance on this machine's loopback


def listen_on_loopback() -> None:
    """Make the local Ray instance kdray starts (no ``RAY_ADDRESS``) listen on 127.0.0.1 only: its GCS, raylet,
    workers and agents otherwise listen on every interface, open to the network of a laptop. Ray does this on
    macOS and Windows; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` in the environment keeps Ray's own choice.
    The variable reaches the processes Ray starts; Ray reads it once at import, so this process's copy of the
    setting is updated too."""
    from ray._private import ray_constants

    if os.environ.setdefault(LOCAL_ONLY, "0") == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(log_to_driver: bool = True) -> None:
    """Join the cluster at ``RAY_ADDRESS`` (``auto``: the one ``ray start`` runs on this machine), or start a
    local instance on loopback, unless this process is already connected.

    The dashboard stays on: Ray Train V2 frees the placement group of a run whose controller was killed
    (a search trial stopped by ASHA) through the State API, which the dashboard serves. Without it the
    stopped trial's workers keep their CPUs/GPUs and the next trial's workers wait for them forever.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            listen_on_loopback()
            address = "local"  # a new instance, even if `ray start` runs one here (join that with RAY_ADDRESS=auto)
        ray.init(
            address=address,
            include_dashboard=True,
            log_to_driver=log_to_driver,
            **ray_init_options(),
        )
