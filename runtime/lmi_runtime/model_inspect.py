"""The facts of the model a pod would serve, read where the model lives, without its weights.

`lmi-runtime inspect` run by the operator as a CPU-only Job, with the pod's LMI settings, reads:
- an s3:// prefix: the listing, config.json, and of each *.safetensors object its first 8 bytes and
  then exactly its header, by ranged GETs, with the same client, credentials and error messages as
  `fetch` (model_store);
- a hub id at its revision: huggingface_hub's `get_safetensors_metadata` (ranged reads of the
  headers) and config.json, with HF_TOKEN and HF_ENDPOINT as huggingface_hub reads them;
- a folder: its files (model_facts.facts_of_directory).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmi_runtime.errors import DownloadError
from lmi_runtime.model_facts import (
    ModelFacts,
    ModelFactsError,
    facts_from,
    facts_of_directory,
    facts_of_files,
    parse_config,
)
from lmi_runtime.model_store import Source, s3_client, s3_error, s3_location
from lmi_runtime.properties import LmiSettings

logger = logging.getLogger(__name__)

# What names the model directory in messages when no model_id is set (LMI then serves the folder).
MODEL_DIR_LABEL = "--model-dir"


def model_source(settings: LmiSettings) -> Source:
    """The model the settings name (option.model_id, else option.model, with option.revision), as
    `fetch` and `serve` read it; without one, the model directory itself, as LMI serves it."""
    model = settings.options.get("model_id") or settings.options.get("model")
    revision = settings.options.get("revision")
    if model is None:
        return Source(str(settings.model_dir), MODEL_DIR_LABEL)
    return Source(model.value.strip(), model.label, revision.value if revision else None)


def facts_of_s3(source: Source, environ: Mapping[str, str]) -> tuple[ModelFacts, int]:
    """The facts of the model under an s3:// prefix and the bytes of object content received (the
    listing's objects directly under the prefix: config.json whole, each *.safetensors header)."""
    from minio.error import MinioException
    from urllib3.exceptions import HTTPError

    bucket, prefix = s3_location(source.value)
    client = s3_client(environ)
    received = 0

    def read(name: str, offset: int, length: int) -> bytes:
        nonlocal received
        if length == 0:
            return b""  # minio reads a length of 0 as "to the end"
        response = client.get_object(
            bucket, f"{prefix}/{name}" if prefix else name, offset=offset, length=length
        )
        try:
            data: bytes = response.read()
        finally:
            response.close()
            response.release_conn()
        received += len(data)
        return data

    try:
        listing = client.list_objects(bucket, prefix=f"{prefix}/" if prefix else None)
        sizes = {
            o.object_name.rsplit("/", 1)[-1]: int(o.size or 0)
            for o in listing
            if o.object_name and not o.is_dir
        }
        if not sizes:
            raise DownloadError(f"{source.describe()}: no objects under this prefix (is the path right?)")
        facts = facts_of_files(source.describe(), sizes, read)
    except (MinioException, HTTPError, ValueError) as error:
        raise s3_error(source, error) from None
    return facts, received


def facts_of_hub(source: Source, environ: Mapping[str, str]) -> ModelFacts:
    """The facts of a hub repository at the source's revision: the safetensors headers by ranged
    reads (huggingface_hub's get_safetensors_metadata) and config.json; no weight is downloaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        SafetensorsParsingError,
    )

    # The hub client's HTTP library's base error (httpx's, or httpx2's from huggingface_hub 2):
    # connection errors are not HfHubHTTPError. errors.py imports it without re-exporting it.
    from huggingface_hub.errors import HTTPError as HubTransportError  # type: ignore[attr-defined]

    endpoint = environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=environ.get("HF_TOKEN") or None)
    where = source.describe() + (f"@{source.revision}" if source.revision else "")
    headers: dict[str, dict[str, Any]] | None
    try:
        try:
            metadata = api.get_safetensors_metadata(source.value, revision=source.revision)
            headers = {
                name: {t: {"dtype": info.dtype, "shape": info.shape} for t, info in file.tensors.items()}
                for name, file in metadata.files_metadata.items()
            }
        except NotASafetensorsRepoError:
            headers = None  # counted from config.json's shapes, as a folder without safetensors
        # A temporary cache: the Job keeps nothing, and a cached "main" could be stale.
        with tempfile.TemporaryDirectory(prefix="lmi-inspect-") as cache:
            path = api.hf_hub_download(source.value, "config.json", revision=source.revision, cache_dir=cache)
            config = parse_config(f"{where}/config.json", Path(str(path)).read_bytes())
    except SafetensorsParsingError as error:
        raise ModelFactsError(f"{where}: {str(error).splitlines()[0]}") from None
    except HfHubHTTPError as error:
        raise DownloadError(f"{where}: the hub refused: {str(error).splitlines()[0]}") from None
    except (HubTransportError, LocalEntryNotFoundError) as error:
        raise DownloadError(
            f"{where}: cannot reach the hub at {endpoint or 'https://huggingface.co'} (HF_ENDPOINT): "
            f"{type(error).__name__}: {str(error).splitlines()[0]}"
        ) from None
    try:
        return facts_from(config, headers)
    except ModelFactsError as error:
        raise ModelFactsError(f"{where}: {error}") from None


def inspect_source(source: Source, environ: Mapping[str, str]) -> ModelFacts:
    """The facts of `source`: an s3:// URL, a folder, or a hub id (a folder of that name wins, as
    for `fetch`). Raises DownloadError when the source cannot be read, ModelFactsError when what
    it holds is not a model."""
    if source.is_s3:
        facts, received = facts_of_s3(source, environ)
        logger.info("inspected %s: %d bytes read, no weights", source.describe(), received)
        return facts
    path = Path(source.value)
    if path.is_dir():
        return facts_of_directory(path, source.describe())
    if source.is_hub:
        return facts_of_hub(source, environ)
    raise ModelFactsError(
        f"{source.describe()}: not a folder, an s3:// URL or a hub id (org/name); nothing to inspect"
    )
