"""An exclusive lease held in a bucket: the model store's lock where there is no POSIX file system (KubeRay, cloud
Ray clusters with nothing but a bucket in common).

Why a lease in the bucket rather than PostgreSQL advisory locks or a named Ray actor (docs/reliability.md): the
store is the bucket, so the bucket is the one service every process that writes it already reaches; the tracking
database sits behind ``mlflow server`` and trials never see it; a Ray actor dies with its cluster and does not
guard a store two clusters share.

The lease is one object, ``<store>/.locks/<name>.lease``. It is taken by creating it with ``If-None-Match: *``
(only one creator wins), kept by rewriting it every third of its term with ``If-Match`` on the last ETag (a
background thread), and given back by deleting it with ``If-Match``. A holder that dies stops renewing: once the
object is older than its term, by the server's own clock, the next taker replaces it with ``If-Match`` on the
ETag it saw (only one taker wins) and says so in a warning. A holder that finds its lease taken over (it was
stalled longer than a term) logs an error; what it then publishes is still safe, as a store entry is written
once by a conditional write and checked by its SHA-256 when read.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import filelock

from kdray.store.objects import Bucket

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class BucketLease:
    """A re-entrant, exclusive lease on ``name`` in ``bucket`` with a term of ``seconds``; the same interface as
    ``filelock.FileLock`` (``acquire(timeout)``, ``release()``, a context manager; ``filelock.Timeout`` when it
    cannot be had in time), so the store hands out either."""

    def __init__(self, bucket: Bucket, name: str, seconds: float) -> None:
        self.bucket = bucket
        self.object = f".locks/{name}.lease"
        self.seconds = seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._mutex = threading.RLock()  # threads of this process take turns; the holding thread may re-enter
        self._depth = 0
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def is_locked(self) -> bool:
        return self._depth > 0

    def _body(self) -> bytes:  # a new body at every write, so that every write gets a new ETag
        return json.dumps({"holder": self.holder, "seconds": self.seconds, "written": time.time()}).encode()

    def acquire(self, timeout: float = -1) -> BucketLease:
        """Take the lease, waiting up to ``timeout`` seconds (-1: for as long as it takes; 0: one try)."""
        deadline = None if timeout < 0 else time.monotonic() + timeout
        if not self._mutex.acquire(timeout=-1 if deadline is None else max(timeout, 0)):
            raise filelock.Timeout(self.bucket.uri + "/" + self.object)
        if self._depth:
            self._depth += 1
            return self
        try:
            while not self._try_take():
                if deadline is not None and time.monotonic() >= deadline:
                    raise filelock.Timeout(self.bucket.uri + "/" + self.object)
                time.sleep(POLL_SECONDS)
        except BaseException:
            self._mutex.release()
            raise
        self._depth = 1
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"lease {self.object}", daemon=True)
        self._renewer.start()
        return self

    def _try_take(self) -> bool:
        self._etag = self.bucket.put(self.object, self._body(), if_none_match=True)
        if self._etag is not None:
            return True
        seen = self.bucket.head(self.object)
        if seen is None:  # given back between the two requests: try again at once
            return False
        age = (seen.server_now - seen.modified).total_seconds()
        if age <= self._term_of_current():
            return False
        self._etag = self.bucket.put(self.object, self._body(), if_match=seen.etag)
        if self._etag is not None:
            log.warning("lease %s/%s: taken over, its holder stopped renewing it %.0f s ago", self.bucket.uri,
                        self.object, age)  # fmt: skip
        return self._etag is not None

    def _term_of_current(self) -> float:
        """The term the current holder wrote (a holder may run with another term than ours)."""
        body = self.bucket.get(self.object)
        try:
            return float(json.loads(body or b"{}").get("seconds", self.seconds))
        except ValueError:
            return self.seconds

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            etag = self._etag
            renewed = self.bucket.put(self.object, self._body(), if_match=etag) if etag else None
            if renewed is None:
                log.error("lease %s/%s was taken over while this process (%s) held it: it was stalled longer than "
                          "its term of %.0f s", self.bucket.uri, self.object, self.holder, self.seconds)  # fmt: skip
                return
            self._etag = renewed

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth == 0:
            self._stop.set()
            if self._renewer is not None:
                self._renewer.join()
            if self._etag is not None:
                self.bucket.delete(self.object, if_match=self._etag)
            self._etag = None
        self._mutex.release()

    def __enter__(self) -> BucketLease:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()
