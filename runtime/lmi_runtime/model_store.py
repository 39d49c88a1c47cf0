"""Model and adapter sources fetched into the cache folder, once per source.

`lmi-runtime fetch` (the pods' init container) downloads the model (option.model_id) into the cache
folder ($LMI_CACHE_DIR, a volume the replicas may share) before the server starts; `serve` then finds
it there and downloads nothing. Adapters are fetched one at a time by `lmi-runtime fetch --adapter`,
which the server runs as a child process when it loads one (adapter_set): an adapter that cannot
be fetched is reported for that adapter and does not keep the model from serving.

- `s3://bucket/prefix`: every object under the prefix, with MinIO's S3 client (not boto3: botocore
  pins python-dateutil below 3, which the operator's kubernetes client needs, and both share the
  image). Credentials from the pod's environment: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, IRSA,
  EKS pod identity, the instance role; the endpoint from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL;
  into <cache>/s3/<bucket>/<prefix>. With
  option.load_format=runai_streamer the model is streamed by vLLM instead and not fetched.
- A Hugging Face hub id: the files vLLM loads (the config and tokenizer files, and one weight
  format: safetensors when the repository has them), into the hub cache under $HF_HOME, where vLLM
  and transformers look. Once fetched, `serve` runs with HF_HUB_OFFLINE=1: no request to the hub.
- A path: nothing to fetch.

A source is fetched under a file lock next to its folder, into a sibling `.partial` folder renamed
into place when complete, then marked complete; a second replica (or a second model with the same
source and revision) waits for the lock and finds the marker. A download that makes no progress for
$LMI_DOWNLOAD_STALL_SECONDS ends the process with exit status 4 and a message saying so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmi_runtime.errors import ERROR_PREFIX, DownloadError
from lmi_runtime.options import CACHE_ENV, EXIT_DOWNLOAD_STALLED, STALL_ENV
from lmi_runtime.properties import LmiSettings, Setting

logger = logging.getLogger(__name__)

DEFAULT_STALL_SECONDS = 600.0
# Written into a source's folder (S3) or the marker folder (hub) once every file is in place.
COMPLETE_MARKER = ".lmi-complete"
# Hub files that are never loaded by vLLM: the original (non-HF) checkpoints some repositories carry.
_HUB_SKIPPED = ("original/*", "*.pth", "consolidated*")
_HUB_WEIGHTS = ("*.safetensors", "*.bin", "*.pt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Source:
    """One thing to fetch: an s3:// URL or a hub id (with its revision), and what named it."""

    value: str
    label: str
    revision: str | None = None

    @property
    def is_s3(self) -> bool:
        """Whether the source is an s3:// URL."""
        return self.value.startswith("s3://")

    @property
    def is_hub(self) -> bool:
        """Whether the source is a Hugging Face hub id (org/name)."""
        return _HUB_ID.fullmatch(self.value) is not None

    def describe(self) -> str:
        """`label=value`, as every message names a setting."""
        return f"{self.label}={self.value}"


def cache_dir(environ: Mapping[str, str]) -> Path:
    """The cache folder: $LMI_CACHE_DIR (the operator's volume), else ~/.cache/lmi."""
    configured = environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "lmi"


def s3_location(url: str) -> tuple[str, str]:
    """(bucket, prefix without a trailing slash) of an s3:// URL."""
    bucket, _, prefix = url[len("s3://") :].partition("/")
    return bucket, prefix.strip("/")


def local_path(source: Source, cache: Path) -> Path:
    """Where an s3:// source lives in the cache once fetched."""
    bucket, prefix = s3_location(source.value)
    return cache / "s3" / bucket / prefix if prefix else cache / "s3" / bucket


def _hub_marker(source: Source, cache: Path) -> Path:
    name = source.value.replace("/", "--")
    return cache / "hub-fetched" / f"{name}@{source.revision or 'main'}"


def _marker_of(source: Source, cache: Path) -> Path:
    return local_path(source, cache) if source.is_s3 else _hub_marker(source, cache)


def is_fetched(source: Source, cache: Path) -> bool:
    """Whether `source` is complete in the cache."""
    return (_marker_of(source, cache) / COMPLETE_MARKER).is_file()


def _streamed(settings: LmiSettings) -> bool:
    load_format = settings.options.get("load_format")
    return load_format is not None and "runai" in load_format.value


def _offline(environ: Mapping[str, str]) -> bool:
    return environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def sources(settings: LmiSettings, environ: Mapping[str, str]) -> list[Source]:
    """The sources to fetch: the model (unless vLLM streams it, it is a folder that exists, or it is
    a hub id while HF_HUB_OFFLINE is set: the hub cache is then all there is)."""
    found: list[Source] = []
    model = settings.options.get("model_id") or settings.options.get("model")
    revision = settings.options.get("revision")
    if model is not None and not (model.value.startswith("s3://") and _streamed(settings)):
        source = Source(model.value.strip(), model.label, revision.value if revision else None)
        if source.is_s3 or (source.is_hub and not Path(source.value).exists() and not _offline(environ)):
            found.append(source)
    return found


# --- the stall watchdog --------------------------------------------------------------------------


def _size_of(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue  # renamed into place meanwhile
    return total


class _Watchdog:
    """Ends the process when the bytes under `path` stop growing for `stall_seconds`.

    A blocked socket read cannot be interrupted from another thread, so the only way out of a hung
    download is the process's exit: the lock goes with it, the `.partial` folder is removed by the
    next attempt."""

    def __init__(self, source: Source, path: Path, stall_seconds: float, poll: float = 2.0) -> None:
        self.source, self.path, self.stall_seconds, self.poll = source, path, stall_seconds, poll
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        size, since = -1, time.monotonic()
        while not self._done.wait(self.poll):
            now_size = _size_of(self.path)
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= self.stall_seconds:
                sys.stderr.write(
                    f"{ERROR_PREFIX}download stalled: {self.source.describe()}: no progress for "
                    f"{self.stall_seconds:.0f}s at {size / 2**20:.1f} MiB "
                    f"(spec.startup.downloadStallSeconds, ${STALL_ENV})\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_DOWNLOAD_STALLED)


# --- S3 ------------------------------------------------------------------------------------------

# S3 error codes and what a person should check, in the message of the status.
_S3_ADVICE = {
    "InvalidAccessKeyId": "the access key id is not known to S3: check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret access key does not match the key id: check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "these credentials may not list or read it: grant s3:ListBucket and s3:GetObject",
    "NoSuchBucket": "no such bucket",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
}
_NO_CREDENTIALS = (
    "no AWS credentials: set spec.model.s3.credentialsSecretRef, or give the pod's service account an "
    "IAM role (IRSA, pod identity)"
)


def s3_client(environ: Mapping[str, str]) -> Any:
    """A MinIO client (it speaks the S3 API to AWS and others) with the AWS SDK's usual sources of
    credentials: AWS_* variables, then IRSA, EKS pod identity or the instance role (unless
    AWS_EC2_METADATA_DISABLED), and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS_REGION."""
    from urllib.parse import urlsplit

    from minio import Minio
    from minio.credentials.providers import ChainedProvider, EnvAWSProvider, IamAwsProvider, Provider

    endpoint = (
        environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
    )
    url = urlsplit(endpoint)
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None
    providers: list[Provider] = [EnvAWSProvider()]
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true" or any(
        environ.get(v) for v in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    ):
        providers.append(IamAwsProvider(region=region))
    return Minio(
        url.netloc, secure=url.scheme == "https", region=region, credentials=ChainedProvider(providers)
    )


def s3_error(source: Source, error: Exception) -> DownloadError:
    """The one-line error for an S3 request about `source` that failed: the source, S3's error code
    and what to check."""
    from minio.error import S3Error

    if isinstance(error, S3Error):
        code = str(error.code)
        return DownloadError(f"{source.describe()}: {code}: {_S3_ADVICE.get(code, str(error.message))}")
    if isinstance(error, ValueError) and "credentials" in str(error).lower():
        return DownloadError(f"{source.describe()}: {_NO_CREDENTIALS}")
    return DownloadError(f"{source.describe()}: {type(error).__name__}: {error}")


def _fetch_s3(source: Source, dest: Path, environ: Mapping[str, str]) -> int:
    """Every object under the source's prefix into `dest`; returns the bytes fetched."""
    from minio.error import MinioException
    from urllib3.exceptions import HTTPError

    bucket, prefix = s3_location(source.value)
    client = s3_client(environ)
    total = 0
    try:
        objects = [
            (o.object_name, int(o.size or 0))
            for o in client.list_objects(bucket, prefix=f"{prefix}/" if prefix else None, recursive=True)
            if o.object_name and not o.is_dir
        ]
        if not objects:
            raise DownloadError(f"{source.describe()}: no objects under this prefix (is the path right?)")
        for key, size in objects:
            relative = key[len(prefix) :].lstrip("/") if prefix else key
            if ".." in Path(relative).parts:
                raise DownloadError(f"{source.describe()}: object key {key!r} leaves the prefix")
            client.fget_object(bucket, key, str(dest / relative))
            total += size
    except (MinioException, HTTPError, ValueError) as error:
        raise s3_error(source, error) from None
    return total


# --- Hugging Face hub ------------------------------------------------------------------------------


def hub_patterns(files: list[str]) -> list[str]:
    """The files of a hub repository vLLM loads: everything but weights, plus one weight format
    (the first of safetensors, bin, pt that the repository has, as vLLM picks), no original/ copy."""
    from fnmatch import fnmatch

    def kept(name: str) -> bool:
        return not any(fnmatch(name, pattern) for pattern in _HUB_SKIPPED)

    wanted = [name for name in files if kept(name) and not any(fnmatch(name, p) for p in _HUB_WEIGHTS)]
    for pattern in _HUB_WEIGHTS:
        weights = [name for name in files if kept(name) and fnmatch(name, pattern)]
        if weights:
            return sorted(wanted + weights)
    return sorted(wanted)


def _fetch_hub(source: Source, environ: Mapping[str, str]) -> int:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    token = environ.get("HF_TOKEN") or None
    try:
        files = HfApi(token=token).list_repo_files(source.value, revision=source.revision)
        path = snapshot_download(
            source.value, revision=source.revision, allow_patterns=hub_patterns(files), token=token
        )
    except HfHubHTTPError as error:
        raise DownloadError(f"{source.describe()}: the hub refused: {str(error).splitlines()[0]}") from None
    except OSError as error:
        raise DownloadError(f"{source.describe()}: {type(error).__name__}: {error}") from None
    return _size_of(Path(path))


def _hub_blobs(source: Source, environ: Mapping[str, str]) -> Path:
    home = Path(environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return home / "hub" / f"models--{source.value.replace('/', '--')}"


# --- fetching --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """What fetching one source did: downloaded `bytes`, or found it in the cache."""

    source: Source
    hit: bool
    bytes: int = 0
    seconds: float = 0.0


def fetch(source: Source, cache: Path, environ: Mapping[str, str]) -> Fetched:
    """Make `source` complete in `cache`, downloading it unless a marker says it is there."""
    from filelock import FileLock

    marker_dir = _marker_of(source, cache)
    if (marker_dir / COMPLETE_MARKER).is_file():
        return Fetched(source, hit=True)
    marker_dir.parent.mkdir(parents=True, exist_ok=True)
    stall = float(environ.get(STALL_ENV) or DEFAULT_STALL_SECONDS)
    with FileLock(str(marker_dir) + ".lock"):
        # Another replica may have finished while this one waited for the lock.
        if (marker_dir / COMPLETE_MARKER).is_file():
            return Fetched(source, hit=True)
        started = time.monotonic()
        if source.is_s3:
            partial = marker_dir.with_name(marker_dir.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            with _Watchdog(source, partial, stall):
                size = _fetch_s3(source, partial, environ)
            shutil.rmtree(marker_dir, ignore_errors=True)
            partial.rename(marker_dir)
        else:
            blobs = _hub_blobs(source, environ)
            blobs.mkdir(parents=True, exist_ok=True)
            with _Watchdog(source, blobs, stall):
                size = _fetch_hub(source, environ)
            marker_dir.mkdir(parents=True, exist_ok=True)
        seconds = time.monotonic() - started
        record = {"source": source.value, "revision": source.revision, "bytes": size, "seconds": seconds}
        (marker_dir / COMPLETE_MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")
        return Fetched(source, hit=False, bytes=size, seconds=seconds)


def fetch_all(settings: LmiSettings, environ: Mapping[str, str]) -> list[Fetched]:
    """Fetch every source the configuration names (the init container's work)."""
    cache = cache_dir(environ)
    results = []
    for source in sources(settings, environ):
        done = fetch(source, cache, environ)
        if done.hit:
            logger.info("cache hit: %s is in %s; nothing downloaded", source.describe(), cache)
        else:
            logger.info("fetched %s: %.1f MiB in %.1fs", source.describe(), done.bytes / 2**20, done.seconds)
        results.append(done)
    return results


def localize(
    settings: LmiSettings,
    environ: Mapping[str, str],
    *,
    download: bool,
    set_env: Callable[[str, str], None] | None = None,
) -> LmiSettings:
    """The settings with fetched sources pointing into the cache: a fetched s3:// model id becomes
    its folder there. With `download`, sources not fetched yet are fetched first (`serve` run without
    the init container); `set_env` receives HF_HUB_OFFLINE=1 once the hub model is complete."""
    cache = cache_dir(environ)
    options = dict(settings.options)
    for source in sources(settings, environ):
        if download:
            fetch(source, cache, environ)
        if source.is_hub and is_fetched(source, cache) and set_env is not None:
            set_env("HF_HUB_OFFLINE", "1")
        if source.is_s3 and is_fetched(source, cache):
            key = "model_id" if "model_id" in options else "model"
            options[key] = Setting(str(local_path(source, cache)), options[key].label)
    return dataclasses.replace(settings, options=options)


def fetch_adapter(value: str, label: str, environ: Mapping[str, str]) -> str:
    """Make one adapter source loadable and return what vLLM loads it from: an s3:// URL's folder
    in the cache, a hub id (fetched into the hub cache, where vLLM finds it offline), or a path."""
    source = Source(value, label)
    if not (source.is_s3 or (source.is_hub and not Path(value).exists())):
        return value
    cache = cache_dir(environ)
    done = fetch(source, cache, environ)
    logger.info("%s %s", "cache hit:" if done.hit else "fetched", source.describe())
    return str(local_path(source, cache)) if source.is_s3 else value
