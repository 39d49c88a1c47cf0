"""Credentials out of a cluster: kubeconfig files read by the `kubernetes` package's config loader.

The loader reads what kubectl's kubeconfigs carry: several files (KUBECONFIG's `a:b`, merged as
kubectl does: the first file to name a cluster, user, context or current-context wins),
exec plugins and auth providers (their tokens refreshed when they expire), tokens and token files,
client certificates (files or data), insecure-skip-tls-verify, proxy-url and tls-server-name. Its
`Configuration` is translated into our Credentials; requests stay on KubeClient's aiohttp session.

Memory, VmRSS of `python -c "import lmi_operator.main"` (Python 3.11, kubernetes 37.0.2): 54.5 MiB
without the kubernetes package installed, 64.1 MiB with it, whether this module is imported or not:
kopf imports kubernetes.client as soon as the package is installed (kopf/_cogs/helpers/thirdparty.py),
and importing the config loader on top adds nothing measurable (64.1 MiB). Hence no lazy import here;
kube.py imports this module only on the kubeconfig path, to break the import cycle.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from kubernetes.client import Configuration
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.kube_config import KubeConfigLoader, KubeConfigMerger

from lmi_operator.kube import Credentials


def load_kubeconfig(paths: str) -> Credentials:
    """Credentials of the current context of the kubeconfig files `paths` (joined with ':', as in
    KUBECONFIG). Raises ValueError naming the files and the entry at fault."""
    # The loader writes certificate and key data to files; they go to a folder removed once read.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            merged = KubeConfigMerger(paths)  # type: ignore[no-untyped-call]
            if merged.config is None:
                raise ConfigException("no such file")
            _resolve_paths(merged.config)
            # kubectl takes the first file's current-context; the merger keeps the last one's.
            current = next(
                (c["current-context"] for c in merged.config_files.values() if c.get("current-context")), None
            )
            loader = KubeConfigLoader(  # type: ignore[no-untyped-call]
                config_dict=merged.config, active_context=current, config_base_path=None, temp_file_path=tmp
            )
            # proxy="" keeps HTTPS_PROXY out of the Configuration: only the kubeconfig's proxy-url
            # lands there; KubeClient resolves the environment's, with NO_PROXY, for all credentials.
            cfg = Configuration(proxy="", no_proxy="")
            loader.load_and_set(cfg)  # type: ignore[no-untyped-call]
            context = loader.current_context["context"]
            user = _user(merged.config, context.get("user"))
        except (ConfigException, yaml.YAMLError) as err:
            raise ValueError(f"kubeconfig {paths}: {err}") from err
        ca_data, cert_data, key_data = (_read(f) for f in (cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file))
    where = f"kubeconfig {paths}: context {loader.current_context['name']}"
    # Called per request; a lock because kopf's login handler runs in a thread of its own.
    lock = threading.Lock()

    def token() -> str | None:
        with lock:
            header: str | None = cfg.get_api_key_with_prefix("BearerToken")
        return header.removeprefix("Bearer ") if header else None

    header = cfg.get_api_key_with_prefix("BearerToken")
    if header and not header.startswith("Bearer "):
        raise ValueError(f"{where}: username/password users are not supported (removed from Kubernetes 1.19)")
    if "exec" in user and not header and not cfg.cert_file:
        # The loader logs the plugin's failure and carries on without credentials.
        raise ValueError(f"{where}: the exec plugin {user['exec'].get('command')} gave no credentials")
    if cfg.proxy and urlsplit(cfg.proxy).scheme not in ("http", "https"):
        raise ValueError(f"{where}: proxy-url {cfg.proxy}: only http and https proxies are supported")
    token_path = None
    if "tokenFile" in user and not {"token", "auth-provider", "exec"} & user.keys():
        # The loader reads a token file once; it is re-read per request, as client-go does, so that a
        # rotated token is picked up.
        token_path = Path(user["tokenFile"])
    return Credentials(
        server=cfg.host,
        ca_data=ca_data,
        cert_data=cert_data,
        key_data=key_data,
        token_path=token_path,
        token_source=token if header and token_path is None else None,
        insecure=not cfg.verify_ssl,
        namespace=context.get("namespace") or "default",
        tls_server_name=cfg.tls_server_name,
        proxy=cfg.proxy or None,
    )


def _resolve_paths(config: Any) -> None:
    """Make the file names of the merged kubeconfig's clusters and users absolute, from the folder
    of the file that holds each entry, as kubectl does: the loader would resolve a user's files
    from the folder of the current cluster's file."""
    for section, keys in (
        ("clusters", ("certificate-authority",)),
        ("users", ("client-certificate", "client-key", "tokenFile")),
    ):
        for entry in config.value[section]:
            body = entry.value.get(section[:-1]) or {}
            for key in keys:
                if body.get(key):
                    body[key] = str(Path(entry.path).parent / body[key])


def _user(config: Any, name: str | None) -> dict[str, Any]:
    """The user `name` of the merged kubeconfig; empty when the context names no user."""
    entry = config["users"].get_with_name(name, safe=True) if name else None
    return (entry.value.get("user") or {}) if entry is not None else {}


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None
