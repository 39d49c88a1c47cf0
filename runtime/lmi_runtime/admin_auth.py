"""Signed requests to the adapter management port: the operator signs, the runtime verifies.

The operator holds an Ed25519 private key (made when it starts, never written anywhere) and puts
the public key in each model's ConfigMap, which the pods mount as a directory: the kubelet
refreshes it, so a new operator's key reaches running pods without a restart. Nothing secret is
stored in the cluster, and the operator needs no access to Secrets. A request carries
`Authorization: LMI-Ed25519 <unix time>.<signature>` over its method, path, time and body digest;
the runtime accepts it within MAX_SKEW_SECONDS of its own clock, from any key listed in the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SCHEME = "LMI-Ed25519"
MAX_SKEW_SECONDS = 300


def _message(method: str, path: str, stamp: int, body: bytes) -> bytes:
    return f"{method.upper()}\n{path}\n{stamp}\n{hashlib.sha256(body).hexdigest()}".encode()


class Signer:
    """An Ed25519 key pair that signs management requests."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()

    @property
    def public_key(self) -> str:
        """The public key, base64 of its 32 raw bytes (one line of the pods' key file)."""
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def authorization(self, method: str, path: str, body: bytes, now: float | None = None) -> str:
        """The Authorization header value for one request."""
        stamp = int(time.time() if now is None else now)
        signature = self._key.sign(_message(method, path, stamp, body))
        return f"{SCHEME} {stamp}.{base64.b64encode(signature).decode()}"


def verify(
    header: str, method: str, path: str, body: bytes, public_keys: Iterable[str], now: float | None = None
) -> bool:
    """Whether `header` signs this request with one of `public_keys` (base64, raw Ed25519), recently."""
    scheme, _, value = header.partition(" ")
    stamp_text, _, signature_text = value.partition(".")
    if scheme != SCHEME or not stamp_text.isdigit():
        return False
    stamp = int(stamp_text)
    if abs((time.time() if now is None else now) - stamp) > MAX_SKEW_SECONDS:
        return False
    try:
        signature = base64.b64decode(signature_text, validate=True)
    except (binascii.Error, ValueError):
        return False
    message = _message(method, path, stamp, body)
    for line in public_keys:
        try:
            Ed25519PublicKey.from_public_bytes(base64.b64decode(line.strip(), validate=True)).verify(
                signature, message
            )
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        return True
    return False
