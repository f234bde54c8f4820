"""A local Ray instance started by kdray listens on loopback only: a laptop search is not open to its network."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdray.ray_session import LOCAL_ONLY
from tests.conftest import alive, process_tree

PROBE = """
import os, time
from kdray.ray_session import connect_ray
connect_ray(log_to_driver=False)
import ray
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
time.sleep(600)
"""


def listening_sockets(pids: set[int]) -> set[tuple[str, str]]:
    """(address, port) in hex, as /proc/net/tcp{,6} write them, on which ``pids`` accept TCP connections."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # the process ended meanwhile
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(tuple(fields[1].rsplit(":", 1)))
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_kdrays_local_ray_instance_listens_on_loopback_only_and_dies_with_its_driver(bare_workdir: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", LOCAL_ONLY)}
    probe = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True, env=env)
    processes = {probe.pid}
    try:
        assert probe.stdout is not None
        session = Path(probe.stdout.readline().strip()).name
        assert session.startswith("session_"), "Ray did not start"
        processes = process_tree(probe.pid, naming=session)
        sockets = listening_sockets(processes)
        # Ray's GCS, raylet, workers, dashboard and agents all listen: many sockets, every one on loopback
        assert len(sockets) >= 5 and {address for address, _ in sockets} <= LOOPBACK, sockets
        # and a kill -9 of the process that started it leaves none of its processes behind
        probe.kill()
        probe.wait()
        deadline = time.monotonic() + 60
        while (left := {p for p in process_tree(probe.pid, naming=session) - {probe.pid} if alive(p)}) and (
            time.monotonic() < deadline
        ):
            time.sleep(1)
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left]
    finally:
        for pid in processes:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        probe.wait()
