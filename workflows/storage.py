"""Storage locations: one place that turns a URI into what fsspec, pyarrow, Ray Data and Ray Train
need, and writes objects so that readers only ever see complete ones.

A location is a local path, ``file://…``, ``s3://bucket/prefix`` (s3fs) or any other fsspec
protocol that is installed. Endpoints and credentials come from the standard chain of each
backend (for S3: ``AWS_ENDPOINT_URL``, the ``AWS_*`` environment variables, profiles, instance or
pod identity); a URI that embeds credentials is refused, so none can end up in a manifest, log or
report.

Visibility rules:

- :meth:`Location.write_bytes` — local disk: write a temporary file beside the target, fsync,
  rename over the target; object stores: a single PUT (or a multipart upload, completed in one
  call). Either way a reader sees the old object or the whole new one.
- :meth:`Location.create_bytes` — the same, but only if the object does not exist yet
  (``os.link`` on a local disk, ``If-None-Match: *`` on S3). Returns False when it existed.
- :meth:`Location.read_versioned` / :meth:`Location.replace_if` — compare-and-swap: replace only
  if the object is still the version read (``If-Match: ETag`` on S3, a ``flock``-guarded
  compare-and-rename locally). Leases are built on these (:mod:`workflows.lease`).

Failures: a request to S3 that fails transiently (5xx, a dropped connection, a timeout) is retried
by botocore in its ``standard`` mode (``AWS_MAX_ATTEMPTS`` attempts, default 10, with jittered
exponential back-off; ``AWS_RETRY_MODE`` chooses another mode) and by s3fs; what still fails — and
any error of a local disk (full, read-only, permission denied) — is raised as
:class:`StorageIOError`, an ``OSError`` that names the operation and the URI. A missing object
stays a ``FileNotFoundError``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import fsspec
import fsspec.asyn
import pyarrow.fs

DEFAULT_S3_ATTEMPTS = 10
_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
"""What :meth:`Location.write_bytes` names its temporary files on a local disk."""
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60


def _remote_options(protocol: str) -> dict[str, Any]:
    """Options of the fsspec filesystem of ``protocol``. Listings are never served from a cache:
    whether a shard or manifest exists decides what runs. S3 requests are retried (see the module
    docstring); the options are read from the environment when the filesystem is made, so they
    are part of fsspec's instance key."""
    if protocol == "s3":
        retries = {
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_S3_ATTEMPTS)),
        }
        config = {"retries": retries, "connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": S3_READ_TIMEOUT_S}
        return {"use_listings_cache": False, "config_kwargs": config}
    if protocol == "gs":
        return {"use_listings_cache": False}
    return {}


class StorageError(ValueError):
    """A storage URI is malformed or unusable."""


class StorageIOError(OSError):
    """Reading or writing a location failed (after the backend's retries); names the URI."""

    def __init__(self, operation: str, uri: str, error: BaseException):
        detail = str(error) or type(error).__name__
        super().__init__(f"cannot {operation} {uri}: {type(error).__name__}: {detail}")
        self.errno = getattr(error, "errno", None)


def _failed(operation: str, uri: str, error: OSError) -> OSError:
    """``error`` itself when it is a FileNotFoundError or already names the URI, else a
    :class:`StorageIOError` naming ``operation`` and ``uri``."""
    if isinstance(error, (FileNotFoundError, StorageIOError)):
        return error
    return StorageIOError(operation, uri, error)


def _split(uri: str) -> tuple[str, str]:
    """(protocol, path) for a URI or local path; local paths become absolute."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"storage URI must be a non-empty string, got {uri!r}")
    uri = uri.strip()
    if "://" not in uri:
        return "file", os.path.abspath(os.path.expanduser(uri))
    parts = urlsplit(uri)
    protocol = parts.scheme.lower()
    if parts.username or parts.password:
        raise StorageError(
            f"storage URI {protocol}://…@{parts.hostname} embeds credentials; remove them and "
            "use the standard credential chain (environment, profile or cloud identity)"
        )
    if parts.query or parts.fragment:
        raise StorageError(f"storage URI {uri!r} must not have a query or fragment")
    if protocol == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {uri!r} names a host; use file:///absolute/path")
        return "file", os.path.abspath(parts.path)
    if protocol not in fsspec.available_protocols():
        raise StorageError(f"storage URI {uri!r}: unknown protocol {protocol!r}")
    if not parts.netloc:
        raise StorageError(f"storage URI {uri!r} has no bucket or host")
    path = posixpath.normpath(f"{parts.netloc}/{parts.path.lstrip('/')}").rstrip("/")
    return protocol, path


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem, addressed by ``uri``."""

    protocol: str
    path: str

    @classmethod
    def parse(cls, uri: str) -> Location:
        protocol, path = _split(uri)
        return cls(protocol, path)

    @property
    def uri(self) -> str:
        return self.path if self.protocol == "file" else f"{self.protocol}://{self.path}"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.protocol, posixpath.dirname(self.path))

    def __str__(self) -> str:
        return self.uri

    def join(self, *parts: str) -> Location:
        """A child location; parts may not climb out with ``..`` or be absolute."""
        for part in parts:
            pieces = part.split("/")
            if part.startswith("/") or ".." in pieces or "" in pieces:
                raise StorageError(f"path component {part!r} under {self.uri} is not a plain relative path")
        return Location(self.protocol, posixpath.join(self.path, *parts))

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem (instances are shared per protocol)."""
        try:
            return fsspec.filesystem(self.protocol, **_remote_options(self.protocol))
        except ImportError as error:
            raise StorageError(
                f"storage URI {self.uri}: the {self.protocol} backend is not installed ({error})"
            ) from None

    @cached_property
    def arrow_fs(self) -> pyarrow.fs.FileSystem:
        """A pyarrow filesystem over the same fsspec backend (for pyarrow, Ray Data, Ray Train)."""
        if self.is_local:
            return pyarrow.fs.LocalFileSystem()
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))

    # -- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.path))
        except OSError as error:
            raise _failed("check", self.uri, error) from None

    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} does not exist") from None
        except OSError as error:
            raise _failed("read", self.uri, error) from None

    def read_json(self) -> Any:
        data = self.read_bytes()
        try:
            return json.loads(data)
        except ValueError as error:
            raise ValueError(f"{self.uri} is not valid JSON: {error}") from None

    def size(self) -> int:
        try:
            return int(self.fs.size(self.path))
        except OSError as error:
            raise _failed("stat", self.uri, error) from None

    def list_names(self) -> list[str]:
        """Names of the entries directly under this folder ([] when it does not exist)."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        except OSError as error:
            raise _failed("list", self.uri, error) from None
        return sorted(posixpath.basename(str(entry).rstrip("/")) for entry in entries)

    def list_sizes(self) -> dict[str, int]:
        """{name: bytes} of the files directly under this folder, from one listing ({} when it
        does not exist)."""
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise _failed("list", self.uri, error) from None
        return {
            posixpath.basename(str(entry["name"]).rstrip("/")): int(entry.get("size") or 0)
            for entry in entries
            if entry.get("type") == "file"
        }

    # -- writing ---------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        """Write the whole object so that readers never see a partial one."""
        try:
            if self.is_local:
                self._write_local(data, exclusive=False)
            else:
                self.fs.pipe_file(self.path, data)
        except OSError as error:
            raise _failed("write", self.uri, error) from None

    def create_bytes(self, data: bytes) -> bool:
        """Like :meth:`write_bytes`, but only when nothing is there yet; False if it existed."""
        try:
            if self.is_local:
                return self._write_local(data, exclusive=True)
            self.fs.pipe_file(self.path, data, mode="create")
        except OSError as error:
            if _lost_a_condition(error):
                return False
            raise _failed("create", self.uri, error) from None
        return True

    # -- compare-and-swap ------------------------------------------------------------------

    def read_versioned(self) -> tuple[bytes, str]:
        """(content, version) of the object, read together: the version is the S3 ETag, or on a
        local disk the sha256 of the content. FileNotFoundError when it is missing."""
        try:
            if self.is_local:
                with open(self.path, "rb") as handle:
                    data = handle.read()
                return data, hashlib.sha256(data).hexdigest()
            bucket, key = self._bucket_key("read a version of")
            return fsspec.asyn.sync(self.fs.loop, _get_with_etag, self.fs, bucket, key)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} does not exist") from None
        except OSError as error:
            raise _failed("read", self.uri, error) from None

    def replace_if(self, data: bytes, version: str) -> str | None:
        """Replace the object with ``data`` only if it is still at ``version`` (from
        :meth:`read_versioned`): ``If-Match: ETag`` on S3; on a local disk the comparison and the
        atomic rename happen under an exclusive ``flock`` of its folder (processes of one host;
        NFS honours it through its lock manager). The new version when replaced; None when the
        object changed or vanished meanwhile."""
        try:
            if self.is_local:
                return hashlib.sha256(data).hexdigest() if self._replace_local_if(data, version) else None
            bucket, key = self._bucket_key("replace conditionally")
            response = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
            self.fs.invalidate_cache(self.path)
            return response["ETag"]
        except FileNotFoundError:
            return None
        except OSError as error:
            if _lost_a_condition(error):
                return None
            raise _failed("replace", self.uri, error) from None

    def delete_if(self, version: str) -> bool:
        """Delete the object only if it is still at ``version`` (``If-Match`` on S3's
        DeleteObject; locally under the same ``flock`` as :meth:`replace_if`). True when deleted,
        False when it changed or was already gone."""
        try:
            if self.is_local:
                return self._replace_local_if(None, version)
            bucket, key = self._bucket_key("delete conditionally")
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            self.fs.invalidate_cache(self.path)
            return True
        except FileNotFoundError:
            return False
        except OSError as error:
            if _lost_a_condition(error):
                return False
            raise _failed("delete", self.uri, error) from None

    def _bucket_key(self, operation: str) -> tuple[str, str]:
        if self.protocol != "s3":
            raise StorageError(
                f"cannot {operation} {self.uri}: compare-and-swap is implemented for local disks and S3 only"
            )
        bucket, _, key = self.path.partition("/")
        return bucket, key

    def _replace_local_if(self, data: bytes | None, version: str) -> bool:
        """Under an exclusive ``flock`` of the parent folder: if the file's sha256 is ``version``,
        replace it with ``data`` (atomic rename), or remove it when ``data`` is None. (A folder
        removed meanwhile holds no file, so the comparison fails: the lock never needs cleaning.)"""
        try:
            folder = os.open(os.path.dirname(self.path), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            try:
                with open(self.path, "rb") as current:
                    if hashlib.sha256(current.read()).hexdigest() != version:
                        return False
            except FileNotFoundError:
                return False
            if data is None:
                os.unlink(self.path)
            else:
                self._write_local(data, exclusive=False)
            return True
        finally:
            os.close(folder)  # releases the flock

    def write_json(self, value: Any) -> None:
        self.write_bytes(json.dumps(value, indent=1, sort_keys=True).encode())

    def delete(self) -> None:
        """Remove the object, or the folder and everything under it (missing is fine)."""
        try:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise _failed("delete", self.uri, error) from None

    def _write_local(self, data: bytes, exclusive: bool) -> bool:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{self.name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if not exclusive:
                os.replace(temporary, self.path)
                return True
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def remove_temporaries(self, sparing: str | None = None) -> list[str]:
        """Remove the temporary files that writers killed mid-write left under this local folder
        (they are never read: a local write becomes visible only by its rename; on object stores
        a write is one PUT and leaves nothing). Call it only when no writer of the folder can still
        be running, except writers of the file named ``sparing`` (whose temporaries stay). Returns
        the removed paths."""
        removed = []
        if not self.is_local:
            return removed
        spared = f".{sparing}.tmp-" if sparing else None
        for directory, _, names in os.walk(self.path):
            for name in names:
                if _TEMPORARY.match(name) and not (spared and name.startswith(spared)):
                    path = os.path.join(directory, name)
                    try:
                        os.unlink(path)
                        removed.append(path)
                    except OSError:
                        pass
        return removed


async def _get_with_etag(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with response["Body"] as body:
        return await body.read(), response["ETag"]


def _lost_a_condition(error: BaseException) -> bool:
    """Whether a failed request lost a condition (``If-None-Match`` / ``If-Match``: HTTP 412, or
    409 when S3 saw a concurrent conditional write) rather than failing for another reason;
    decided from botocore's error code, which s3fs keeps as the cause."""
    if isinstance(error, FileExistsError):
        return True
    cause = error.__cause__
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def location(uri: str | Location) -> Location:
    """``uri`` as a :class:`Location` (a Location is returned unchanged)."""
    return uri if isinstance(uri, Location) else Location.parse(uri)
