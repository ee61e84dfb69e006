"""Where the trainer reads and writes: s3:// objects and prefixes, local paths (file://), and hf:// models.

One `Storage` per run. Every operation takes a URI; S3 errors that retrying cannot fix (missing bucket or
object, wrong credentials) become `InvalidInput` naming the URI, everything else `TrainerFailure`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune_trainer.config import StorageSpec
from kubetune_trainer.errors import InvalidInput, TrainerFailure

log = logging.getLogger(__name__)

# Codes S3 (and S3-compatible stores) answer when the request itself is wrong: never worth a retry.
_NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden", "InvalidToken"}
DOWNLOAD_THREADS = 8
# Writes (checkpoints, artifacts, markers) ride out a storage outage this long, measured once for every write
# from the first failure (files still queued behind it share the window, they do not start their own): whole
# objects retried with backoff doubling from 1 s to at most 30 s, the last retry at the window's end; then the
# run fails with exit 1 (retryable, resumed from the newest complete checkpoint). Reads need no such patience:
# they happen at setup, where failing is cheap.
WRITE_RETRY_SECONDS = 180.0
WRITE_RETRY_MAX_DELAY = 30.0
RETRY_REPORT_SECONDS = 5.0  # how often a waiting write refreshes what `on_retry` says (the seconds it counts)
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A parsed URI: scheme s3 (bucket, key), file (path) or hf (repo, revision)."""

    scheme: str
    bucket: str = ""
    key: str = ""
    path: str = ""
    revision: str | None = None

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        if self.scheme == "hf":
            return f"hf://{self.path}" + (f"@{self.revision}" if self.revision else "")
        return self.path


def parse_uri(uri: str) -> Location:
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return Location("s3", bucket=bucket, key=key)
    if uri.startswith("hf://"):
        repo, _, revision = uri[len("hf://") :].partition("@")
        return Location("hf", path=repo.rstrip("/"), revision=revision or None)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return Location("file", path=uri)


def join(uri: str, *parts: str) -> str:
    """`join("s3://b/run", "adapter", "x")` -> `s3://b/run/adapter/x` (one slash between parts)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


class DownloadCancelled(Exception):
    """A download given up because the run is stopping."""


class Storage:
    """S3 (endpoint and region from the config, credentials from the standard AWS environment) and files."""

    def __init__(self, spec: StorageSpec | None = None, *, max_attempts: int = 4, connect_timeout: float = 5.0):
        self.spec = spec or StorageSpec()
        self._max_attempts = max_attempts
        self._connect_timeout = connect_timeout
        self._client: Any = None
        self.write_retry_seconds = WRITE_RETRY_SECONDS
        # Told the error being retried (None once writes go through again), e.g. to show it in /progress.
        self.on_retry: Callable[[str | None], None] | None = None
        # When the current outage began (the first failed write since the last one that went through): every
        # write retries until write_retry_seconds after it.
        self._outage_since: float | None = None
        self._outage_lock = threading.Lock()
        # Set (by a stop request): downloads in flight give up at their next chunk, so a stop during a long
        # model download ends within the grace. Uploads are never cut: they may be the checkpoint a stop wants.
        self.cancel_downloads: threading.Event | None = None

    # -- S3 plumbing -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                region_name=self.spec.region,
                # standard mode retries throttling, 5xx and connection errors with jittered backoff and
                # never retries 4xx such as AccessDenied; a small max_attempts keeps a dead endpoint quick.
                retries={"mode": "standard", "max_attempts": self._max_attempts},
                connect_timeout=self._connect_timeout,
                read_timeout=60,
                s3={"addressing_style": "path"} if self.spec.endpoint else {},
                max_pool_connections=DOWNLOAD_THREADS * 2,
            )
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.spec.endpoint, region_name=self.spec.region, config=config
            )
        return self._client

    @property
    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        # io_chunksize: a download looks at `cancel_downloads` once per chunk read. At boto's 256 KiB a slow link
        # (15 KB/s in tests/trainer/test_faults.py) read one chunk in 17 s, so a stop outlasted its 20 s grace;
        # 64 KiB is a check every 4 s there, and every few milliseconds at ordinary speeds.
        return TransferConfig(
            multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=8, io_chunksize=64 * 2**10
        )

    def _failure(self, exc: Exception, uri: str, action: str) -> TrainerFailure:
        """Map a boto/botocore error to the failure a user can act on."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        endpoint = self.spec.endpoint or "AWS S3"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return InvalidInput("BucketNotFound", f"cannot {action} {uri}: bucket does not exist at {endpoint}")
            if code in _NOT_FOUND:
                return InvalidInput("ObjectNotFound", f"cannot {action} {uri}: no such object at {endpoint}")
            if code in _DENIED:
                return InvalidInput(
                    "AccessDenied",
                    f"cannot {action} {uri}: {code} from {endpoint}; check the S3 credentials "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from storage.credentialsSecretRef) and their policy",
                )
            return TrainerFailure("StorageError", f"cannot {action} {uri}: {code or exc} from {endpoint}")
        if isinstance(exc, NoCredentialsError):
            return InvalidInput("AccessDenied", f"cannot {action} {uri}: no S3 credentials found")
        if isinstance(exc, EndpointConnectionError):
            return TrainerFailure("StorageUnreachable", f"cannot {action} {uri}: {exc} (endpoint {endpoint})")
        return TrainerFailure("StorageError", f"cannot {action} {uri} at {endpoint}: {exc}")

    def _s3_keys(self, loc: Location) -> list[tuple[str, int]]:
        """(key, size) of every object under the prefix `loc.key` (listing pages of 1000)."""
        from botocore.exceptions import BotoCoreError, ClientError

        out: list[tuple[str, int]] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
                out.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, loc.uri, "list") from exc
        return out

    def _write_with_retries(self, uri: str, write: Callable[[], T]) -> T:
        """`write()`, retried through transient failures (unreachable, 5xx, throttling) until
        `write_retry_seconds` after the outage's first failure, whichever write saw it; what retrying cannot fix
        (InvalidInput) fails at once."""
        delay, attempt = 1.0, 1
        while True:
            try:
                result = write()
            except TrainerFailure as failure:
                if isinstance(failure, InvalidInput):
                    raise
                now = time.monotonic()
                with self._outage_lock:
                    if self._outage_since is None:
                        self._outage_since = now
                    since = self._outage_since
                left = since + self.write_retry_seconds - now
                if left <= 0:
                    raise
                wait = min(delay, left)  # the last retry is at the deadline, never skipped
                log.warning(
                    "storage: %s; retrying in %.0f s (attempt %d, %.0f s of %.0f)",
                    failure.error.message,
                    wait,
                    attempt,
                    now - since,
                    self.write_retry_seconds,
                )
                self._wait_reporting(wait, since, failure.error.message)
                delay, attempt = min(delay * 2, WRITE_RETRY_MAX_DELAY), attempt + 1
                continue
            with self._outage_lock:
                self._outage_since = None
            if attempt > 1:
                log.info("storage: %s written after %d attempts", uri, attempt)
                if self.on_retry is not None:
                    self.on_retry(None)
            return result

    def _wait_reporting(self, seconds: float, since: float, problem: str) -> None:
        """Sleep `seconds`, telling `on_retry` every few seconds how long the outage has lasted."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.on_retry is not None:
                self.on_retry(
                    f"storage unreachable, retrying for {time.monotonic() - since:.0f} s of "
                    f"{self.write_retry_seconds:.0f}: {problem}"
                )
            time.sleep(min(left, RETRY_REPORT_SECONDS))

    # -- the operations ----------------------------------------------------------------------------

    def list(self, uri: str) -> list[str]:
        """URIs of every object/file under a prefix/directory (recursively), sorted."""
        loc = parse_uri(uri)
        if loc.scheme == "s3":
            return sorted(f"s3://{loc.bucket}/{key}" for key, _ in self._s3_keys(loc))
        root = Path(loc.path)
        if root.is_file():
            return [str(root)]
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file())

    def size(self, uri: str) -> int | None:
        """Bytes of every object under an s3:// prefix (the listing's sizes); None where no listing says
        (local paths, hf://)."""
        loc = parse_uri(uri)
        if loc.scheme != "s3":
            return None
        return sum(size for key, size in self._s3_keys(loc) if not key.endswith("/"))

    def version(self, uri: str) -> str:
        """What identifies the content at `uri` today, for a local cache of it: for an S3 prefix, a digest of its
        objects' keys, sizes and ETags (a changed or replaced file changes it), for hf:// the source with its
        revision; elsewhere the URI itself."""
        loc = parse_uri(uri)
        if loc.scheme != "s3":
            return loc.uri
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = loc.key if loc.key.endswith("/") or not loc.key else loc.key + "/"
        digest = hashlib.sha256(f"s3://{loc.bucket}/{prefix}".encode())
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    digest.update(f"\n{obj['Key']} {obj['Size']} {obj.get('ETag', '')}".encode())
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, uri, "list") from exc
        return f"s3://{loc.bucket}/{prefix} sha256:{digest.hexdigest()}"

    def exists(self, uri: str) -> bool:
        loc = parse_uri(uri)
        if loc.scheme == "file":
            return Path(loc.path).exists()
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND - {"NoSuchBucket"}:
                return False
            raise self._failure(exc, uri, "read") from exc
        except BotoCoreError as exc:
            raise self._failure(exc, uri, "read") from exc

    def check_bucket(self, uri: str) -> None:
        """Fail early (InvalidInput) when the destination bucket is missing or not ours."""
        loc = parse_uri(uri)
        if loc.scheme != "s3":
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # ListObjects, not HeadBucket: a HEAD answer has no body, so a 403 would not say which
            # credential problem it is (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied).
            self.client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"404", "NotFound", "NoSuchBucket"}:
                raise InvalidInput(
                    "BucketNotFound", f"bucket of {uri} does not exist at {self.spec.endpoint or 'AWS S3'}"
                ) from exc
            raise self._failure(exc, uri, "access") from exc
        except BotoCoreError as exc:
            raise self._failure(exc, uri, "access") from exc

    def read_bytes(self, uri: str) -> bytes:
        loc = parse_uri(uri)
        if loc.scheme == "file":
            try:
                return Path(loc.path).read_bytes()
            except OSError as exc:
                raise InvalidInput("ObjectNotFound", f"cannot read {uri}: {exc.strerror}") from exc
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, uri, "read") from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        loc = parse_uri(uri)
        if loc.scheme == "file":
            path = Path(loc.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        from botocore.exceptions import BotoCoreError, ClientError

        def put() -> None:
            try:
                self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
            except (ClientError, BotoCoreError) as exc:
                raise self._failure(exc, uri, "write") from exc

        self._write_with_retries(uri, put)

    # -- conditional writes (the destination's lease) ----------------------------------------------

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        """An object's content and version (S3: its ETag; a file: a digest of its content), None if absent.
        One attempt: the caller polls."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            try:
                data = Path(loc.path).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise TrainerFailure("StorageError", f"cannot read {uri}: {exc.strerror}") from exc
            return data, hashlib.sha256(data).hexdigest()
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.get_object(Bucket=loc.bucket, Key=loc.key)
            return answer["Body"].read(), str(answer["ETag"])
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND - {"NoSuchBucket"}:
                return None
            raise self._failure(exc, uri, "read") from exc
        except BotoCoreError as exc:
            raise self._failure(exc, uri, "read") from exc

    def write_if(self, uri: str, data: bytes, *, version: str | None) -> str | None:
        """Write `data` only if the object is still at `version` (None: only if there is none); returns the new
        version, or None when the condition did not hold. S3's conditional writes (If-Match, If-None-Match: *;
        AWS, moto and SeaweedFS honour both); a store that refuses them (501) gets a plain write, and the
        caller's read-back is then the only check. Files: compare and replace under an flock. One attempt."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            return self._write_file_if(Path(loc.path), data, version)
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            try:
                answer = self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **condition)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in (409, 412):
                    return None
                if code != "NotImplemented" and status != 501:
                    raise
                log.warning("storage: %s has no conditional writes; writing %s unconditionally", loc.bucket, uri)
                answer = self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, uri, "write") from exc
        return str(answer["ETag"])

    @staticmethod
    def _write_file_if(path: Path, data: bytes, version: str | None) -> str | None:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        with path.with_name(path.name + ".lock").open("a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                current: str | None = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != version:
                return None
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return hashlib.sha256(data).hexdigest()

    def upload_file(self, local: Path, uri: str) -> None:
        loc = parse_uri(uri)
        if loc.scheme == "file":
            target = Path(loc.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
            return
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        def upload() -> None:
            try:
                self.client.upload_file(str(local), loc.bucket, loc.key, Config=self._transfer_config)
            except S3UploadFailedError as exc:
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, ClientError | BotoCoreError):
                    raise self._failure(cause, uri, "write") from exc
                raise TrainerFailure("StorageError", f"cannot write {uri}: {exc}") from exc
            except (ClientError, BotoCoreError) as exc:
                raise self._failure(exc, uri, "write") from exc

        self._write_with_retries(uri, upload)

    def upload_dir(self, local_dir: Path, uri: str, *, exclude: Iterable[str] = ()) -> int:
        """Upload every file under `local_dir` to the prefix `uri`, in parallel; returns bytes uploaded."""
        skip = set(exclude)
        files = [p for p in sorted(Path(local_dir).rglob("*")) if p.is_file() and p.name not in skip]

        def one(path: Path) -> int:
            self.upload_file(path, join(uri, path.relative_to(local_dir).as_posix()))
            return path.stat().st_size

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            return sum(pool.map(one, files))

    def download(self, uri: str, local_dir: Path) -> Path:
        """Fetch an object (to `local_dir/<name>`) or every object under a prefix (keeping the relative
        layout) in parallel. Returns the local file or directory. Local URIs are returned as they are."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            path = Path(loc.path)
            if not path.exists():
                raise InvalidInput("ObjectNotFound", f"{uri} does not exist")
            return path
        if loc.scheme == "hf":
            return self._download_hf(loc, local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        if loc.key and not loc.key.endswith("/"):
            objects = self._s3_keys(loc)
            if any(key == loc.key for key, _ in objects):
                target = local_dir / Path(loc.key).name
                self._get(loc.bucket, loc.key, target)
                return target
            loc = Location("s3", bucket=loc.bucket, key=loc.key + "/")
        objects = [(k, s) for k, s in self._s3_keys(loc) if not k.endswith("/")]
        if not objects:
            raise InvalidInput("ObjectNotFound", f"no object at {uri} (nor under {loc.uri})")

        def one(item: tuple[str, int]) -> None:
            self._get(loc.bucket, item[0], local_dir / item[0][len(loc.key) :])

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            list(pool.map(one, objects))
        return local_dir

    def _get(self, bucket: str, key: str, target: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        target.parent.mkdir(parents=True, exist_ok=True)
        cancel = self.cancel_downloads

        def check_cancelled(_bytes: int) -> None:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(f"s3://{bucket}/{key}")

        try:
            self.client.download_file(bucket, key, str(target), Config=self._transfer_config, Callback=check_cancelled)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, f"s3://{bucket}/{key}", "read") from exc

    def _download_hf(self, loc: Location, local_dir: Path) -> Path:
        """hf://org/name[@revision] via the Hub client; HF_TOKEN from the environment for gated models."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            return Path(
                snapshot_download(
                    loc.path, revision=loc.revision, token=os.environ.get("HF_TOKEN") or None, local_dir=local_dir
                )
            )
        except GatedRepoError as exc:
            raise InvalidInput("AccessDenied", f"{loc.uri} is gated: set model.tokenSecretRef ({exc})") from exc
        except RevisionNotFoundError as exc:
            raise InvalidInput("ModelNotFound", f"{loc.uri}: no such revision") from exc
        except RepositoryNotFoundError as exc:
            raise InvalidInput("ModelNotFound", f"{loc.uri}: no such repository (or no access)") from exc
        except Exception as exc:
            raise TrainerFailure("StorageError", f"cannot download {loc.uri}: {exc}") from exc

    def delete_object(self, uri: str) -> None:
        """Delete one object or file; one that is not there is no error."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            Path(loc.path).unlink(missing_ok=True)
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=loc.bucket, Key=loc.key)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, uri, "delete") from exc

    def delete_prefix(self, uri: str) -> None:
        loc = parse_uri(uri)
        if loc.scheme == "file":
            shutil.rmtree(loc.path, ignore_errors=True)
            return
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = Location("s3", bucket=loc.bucket, key=loc.key.rstrip("/") + "/")
        keys = [key for key, _ in self._s3_keys(prefix)]
        try:
            for start in range(0, len(keys), 1000):
                chunk = [{"Key": k} for k in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=loc.bucket, Delete={"Objects": chunk, "Quiet": True})
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, uri, "delete") from exc
