"""Volumes for the tests' cache claims: a hostPath PersistentVolume (what a provisioner would give a
claim on a real cluster) and a claim bound to it, so that the PV controller binds them for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What the claims ask for, and what the volumes offer (room for any example's claim).
STORAGE, CAPACITY = "10Gi", "1Ti"


def host_volume(
    name: str, path: Path, claim: tuple[str, str] | None = None, storage_class: str = ""
) -> dict[str, Any]:
    """A ReadWriteMany hostPath PersistentVolume at `path`, reserved for the claim (namespace, name)
    when given."""
    spec: dict[str, Any] = {
        "capacity": {"storage": CAPACITY},
        "accessModes": ["ReadWriteMany"],
        "persistentVolumeReclaimPolicy": "Retain",
        "storageClassName": storage_class,
        "hostPath": {"path": str(path)},
    }
    if claim is not None:
        spec["claimRef"] = {"namespace": claim[0], "name": claim[1]}
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": spec}


def shared_claim(namespace: str, name: str, folder: Path, storage_class: str) -> list[dict[str, Any]]:
    """A ReadWriteMany claim `name` in `namespace` and the hostPath volume at `folder` it binds to.
    The folder is made writable by all: pods run as uid 1000 and hostPath volumes get no fsGroup."""
    folder.mkdir(mode=0o777, exist_ok=True)
    folder.chmod(0o777)
    volume_name = f"{namespace}-{name}"
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": storage_class,
            "volumeName": volume_name,
            "resources": {"requests": {"storage": STORAGE}},
        },
    }
    return [host_volume(volume_name, folder, (namespace, name), storage_class), claim]
