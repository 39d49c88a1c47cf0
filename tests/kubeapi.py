"""A synchronous API client for tests that send many requests (kubectl costs a process each)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lmi_operator.kube import Credentials, load_credentials, ssl_context


class Api:
    """Requests against the cluster of one kubeconfig; answers (status, decoded body), status 0 when
    the connection failed."""

    def __init__(self, kubeconfig: Path) -> None:
        self.creds: Credentials = load_credentials(str(kubeconfig))
        self.ssl: ssl.SSLContext = ssl_context(self.creds)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.creds.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if token := self.creds.bearer():
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            text = err.read()
            try:
                return err.code, json.loads(text)
            except ValueError:
                return err.code, text.decode(errors="replace")
        except OSError as err:  # the server closed the connection (say, on a request over its limit)
            return 0, repr(err)
