"""Objects in an S3 bucket (``s3://bucket/prefix``), with the two conditional writes the model store relies on.

S3 gives no rename and no file lock, but it gives conditional writes: ``If-None-Match: *`` creates an object only
if its name is free, and ``If-Match: <etag>`` replaces (or deletes) it only if nobody changed it since it was read.
The first publishes a store entry exactly once; both together make a lease (``kdray.store.lease``). Every S3 service
kdray is tested against has them (AWS S3 since 2024, MinIO, moto); a service without them cannot hold a store.

The client is boto3's, so the endpoint, credentials and region come from the usual AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, …), the same ones pyarrow reads for Ray's storage.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from kdray.schema import ConfigError

SCHEME = "s3://"


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD of an object says: its ETag, when it was last written and the server's clock at the answer
    (both by the server's clock, so comparing them needs no agreement between machines' clocks)."""

    etag: str
    modified: datetime
    server_now: datetime


def _client() -> Any:
    """boto3's S3 client for the endpoint the AWS variables name now (one per endpoint; clients are thread-safe)."""
    return _client_for(os.environ.get("AWS_ENDPOINT_URL"))


@functools.cache
def _client_for(endpoint: str | None) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("store.path=s3://… needs boto3: pip install 'kdray[cluster]'") from None
    return boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"mode": "standard", "max_attempts": 5}))


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class Bucket:
    """The objects under one ``s3://bucket/prefix``, named by paths relative to the prefix."""

    def __init__(self, uri: str) -> None:
        if not uri.startswith(SCHEME):
            raise ConfigError(f"{uri}: a bucket is named s3://bucket/prefix (no other scheme holds a model store)")
        self.uri = uri.rstrip("/")
        self.name, _, prefix = self.uri.removeprefix(SCHEME).partition("/")
        self.prefix = f"{prefix}/" if prefix else ""

    def key(self, name: str) -> str:
        return self.prefix + name

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        try:
            return _client().get_object(Bucket=self.name, Key=self.key(name))["Body"].read()
        except Exception as error:
            if _code(error) in ("NoSuchKey", "404"):
                return None
            raise

    def head(self, name: str) -> ObjectInfo | None:
        try:
            answer = _client().head_object(Bucket=self.name, Key=self.key(name))
        except Exception as error:
            if _code(error) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        server_now = parsedate_to_datetime(answer["ResponseMetadata"]["HTTPHeaders"]["date"])
        return ObjectInfo(answer["ETag"], answer["LastModified"], server_now)

    def put(self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """Write the object; its new ETag, or None where the condition failed (the name was taken, or the object
        changed since ``if_match`` was read)."""
        conditions: dict[str, str] = {}
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = if_match
        try:
            answer = _client().put_object(Bucket=self.name, Key=self.key(name), Body=data, **conditions)
        except Exception as error:
            # 409 ConditionalRequestConflict: a concurrent conditional write to the same name won the race
            if _code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey"):
                return None
            raise
        return answer["ETag"]

    def delete(self, name: str, *, if_match: str | None = None) -> bool:
        """Delete the object; False where ``if_match`` no longer matches (somebody else wrote it since)."""
        conditions = {"IfMatch": if_match} if if_match is not None else {}
        try:
            _client().delete_object(Bucket=self.name, Key=self.key(name), **conditions)
        except Exception as error:
            if _code(error) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return False
            raise
        return True

    def upload(self, name: str, local: Path) -> None:
        """Upload a local file (multipart for large ones): readers of ``name`` see all of it or nothing."""
        _client().upload_file(str(local), self.name, self.key(name))

    def download(self, name: str, local: Path) -> None:
        _client().download_file(self.name, self.key(name), str(local))

    def copy(self, name: str, to: str) -> None:
        source = {"Bucket": self.name, "Key": self.key(name)}
        _client().copy_object(Bucket=self.name, Key=self.key(to), CopySource=source)

    def folders(self, under: str = "") -> list[str]:
        """The names of the 'folders' (common prefixes) directly under the folder ``under`` ("": the top)."""
        prefix = self.key(f"{under.rstrip('/')}/") if under else self.prefix
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix, Delimiter="/")
        return sorted(p["Prefix"][len(prefix) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", []))

    def names(self, under: str) -> list[str]:
        """Every object's name under the folder ``under`` (recursively), relative to the bucket's prefix."""
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=self.key(under) + "/")
        return sorted(item["Key"][len(self.prefix) :] for page in pages for item in page.get("Contents", []))
