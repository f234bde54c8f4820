"""Real servers on loopback for the cluster-path tests: PostgreSQL in a temporary data directory, and an MLflow
tracking server whose backend store is that database (the cluster head's arrangement, docs/cluster.md).

Both bind 127.0.0.1 only. PostgreSQL refuses to run as root, so under root (CI, containers) its commands run
as the ``postgres`` user Debian's package creates, in a folder handed to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_binary(name: str) -> str | None:
    """A PostgreSQL server program (``initdb``, ``pg_ctl``): on PATH, else in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class Postgres:
    """A PostgreSQL cluster of its own in a new temporary folder (removed by ``stop``), on a free loopback port,
    trusting local connections. The folder is directly under the system's temporary folder: pytest's own are
    private to their owner, and PostgreSQL's user could not enter them."""

    user = "kdray"

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="kdray-postgres-"))
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, *command: str) -> None:
        done = subprocess.run([*self.as_user, *command], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> Postgres:
        initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)")
        if self.as_user:
            shutil.chown(self.folder, "postgres", "postgres")
        data = self.folder / "data"
        self.run(initdb, "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self.run(pg_ctl, "-D", str(data), "-o", options, "-l", str(self.folder / "server.log"), "-w", "start")
        self.run(postgres_binary("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                 "mlflow")  # fmt: skip
        return self

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/mlflow"  # SQLAlchemy: name the driver

    def stop(self) -> None:
        pg_ctl = postgres_binary("pg_ctl")
        if pg_ctl is not None and (self.folder / "data" / "postmaster.pid").exists():
            self.run(pg_ctl, "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on ``backend`` (a database URI), serving its artifacts from ``folder``, on loopback."""

    def __init__(self, backend: str, folder: Path) -> None:
        self.backend = backend
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> MlflowServer:
        """Start it (again, on the same port, after ``stop``) and wait until it answers ``/health``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer in {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and its workers (the whole process group), as a crashed or restarted head would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)
        self.process = None


class S3Server:
    """moto's S3-protocol server on loopback with one bucket, and the AWS variables that point boto3, pyarrow
    (and so Ray's storage) and kdray at it. Credentials are moto's test ones: nothing leaves the machine."""

    bucket = "kdray"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
        }  # fmt: skip

    def start(self, timeout: float = 60) -> S3Server:
        import boto3

        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **self.env},
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2):
                    break
            except OSError as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.folder / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"moto server did not start: {log_text}") from error
                time.sleep(0.3)
        client = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        client.create_bucket(Bucket=self.bucket)
        return self

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)
