"""``kdray ui``: MLflow's own tracking server and UI over the project's store, on loopback by default.

Runs are reviewed in MLflow's UI, nothing home-made: this only resolves the store the way ``kdray
train`` and ``kdray tune`` do (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ./mlflow.db),
refuses a store that does not exist (a typo would otherwise show an empty, freshly created one), and
warns before exposing the server beyond this machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kdray.schema import ConfigError, absolute_uri, default_tracking_uri

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def resolve_store(tracking_uri: str | None) -> str:
    """The tracking store to serve; a ``ConfigError`` naming ``--tracking-uri`` when there is none."""
    uri = existing_store(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise ConfigError(f"--tracking-uri: {uri} is already a tracking server; open it in a browser")
    return uri


def existing_store(tracking_uri: str | None) -> str:
    """The store a reading command (``kdray ui``, ``kdray report``) opens; refused when it is a sqlite file that
    does not exist, which MLflow would otherwise create empty (a typo must not leave a new store behind)."""
    uri = absolute_uri(tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}; run kdray train or kdray tune "
            "first, or point --tracking-uri at the store (sqlite:///path/mlflow.db)"
        )
    return uri


def view_hint(uri: str) -> str:
    """What to type (or open) to see the runs of ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"kdray ui --tracking-uri {uri}"


def server_command(uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` with this interpreter's MLflow (the version kdray logged with)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",  # one reviewer: the default four workers cost seconds of start-up and memory
    ]


def serve(tracking_uri: str | None, host: str, port: int) -> None:
    """Become the server (``exec``: kdray's own process, torch and all, does not stay behind to wait for it);
    it runs in the foreground until Ctrl-C."""
    uri = resolve_store(tracking_uri)
    if host not in LOOPBACK:
        print(
            f"kdray ui: warning: listening on {host}, not loopback: anyone who reaches port {port} can read and "
            "change every run (the server has no login); prefer SSH port forwarding to a loopback server",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    print(f"MLflow UI for {uri}\n  open http://{shown}:{port}  (Ctrl-C stops the server)", flush=True)
    # MLflow 3 also starts job consumers (GenAI evaluation jobs; several processes, ~2 GB) unless told not to:
    # showing runs needs the one server process.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = server_command(uri, host, port)
    os.execve(command[0], command, env)
