"""A real S3 API server for the tests: moto's server mode, with IAM authentication on.

moto (and boto3, which it brings) pin python-dateutil below 3 and the kubernetes client needs 3, so
the server lives in a virtualenv of its own, outside the clone, keyed by its pinned version (built
once per machine with uv, printing progress); the tests' setup (IAM users, uploads) runs there with
boto3 too. The server checks signatures and IAM policies: an unknown access key, a wrong secret and a
user without a policy are refused as AWS refuses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MOTO_VERSION = "5.2.5"
# Requests moto serves without authentication before it starts checking: exactly the ones that
# create the admin user (create_user, put_user_policy, create_access_key).
_SETUP_ACTIONS = 3
REGION = "us-east-1"
_ADMIN_POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'


def _log(message: str) -> None:
    print(f"[s3-server {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def server_venv() -> Path:
    """The virtualenv holding moto's server, created once per machine and version."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    venv = base / "lmi-operator" / f"moto-{MOTO_VERSION}"
    # Written last: a build that was interrupted is redone, not trusted.
    done = venv / ".lmi-complete"
    if done.is_file():
        return venv
    _log(f"installing moto[server]=={MOTO_VERSION} into {venv} (once per machine)")
    shutil.rmtree(venv, ignore_errors=True)
    uv = Path(sys.executable).parent / "uv"
    subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [str(uv), "pip", "install", "-q", "--python", python, f"moto[server]=={MOTO_VERSION}"], check=True
    )
    done.write_text(MOTO_VERSION + "\n")
    return venv


@dataclass(frozen=True)
class Credentials:
    """An IAM user's access key."""

    access_key_id: str
    secret_access_key: str

    def env(self) -> dict[str, str]:
        """The AWS_* variables that make boto3 use this key."""
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}


# Run in the server's virtualenv: one boto3 call given as JSON {service, creds, method, kwargs}, or an
# upload {service: "upload", creds, bucket, prefix, folder}; prints the call's JSON answer.
_CALL = """
import json, pathlib, sys, boto3
call = json.loads(sys.argv[1])
client = boto3.client("s3" if call["service"] == "upload" else call["service"], endpoint_url=call["endpoint"],
    region_name=call["region"], aws_access_key_id=call["creds"][0], aws_secret_access_key=call["creds"][1])
if call["service"] == "upload":
    try:
        client.create_bucket(Bucket=call["bucket"])
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    folder = pathlib.Path(call["folder"])
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = call["prefix"] + "/" + path.relative_to(folder).as_posix()
        client.upload_file(str(path), call["bucket"], key)
    print("{}")
else:
    print(json.dumps(getattr(client, call["method"])(**call["kwargs"]), default=str))
"""


@dataclass
class S3Server:
    """A running moto server and its admin user."""

    process: subprocess.Popen[bytes]
    endpoint: str
    venv: Path
    admin: Credentials

    def call(self, service: str, method: str, credentials: Credentials | None = None, **kwargs: Any) -> Any:
        """One boto3 client call against the server (as the admin unless told), run in its virtualenv."""
        creds = credentials or self.admin
        payload = {
            "service": service,
            "method": method,
            "kwargs": kwargs,
            "endpoint": self.endpoint,
            "region": REGION,
            "creds": [creds.access_key_id, creds.secret_access_key],
        }
        return self._run(payload)

    def _run(self, payload: dict[str, Any]) -> Any:
        done = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", _CALL, json.dumps(payload)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"S3 server call {payload.get('method') or payload['service']}: {done.stderr[-2000:]}"
            )
        return json.loads(done.stdout)

    def user(self, name: str, policy: str | None) -> Credentials:
        """A new IAM user with an inline `policy` (None: no permission at all) and its access key."""
        self.call("iam", "create_user", UserName=name)
        if policy is not None:
            self.call("iam", "put_user_policy", UserName=name, PolicyName="p", PolicyDocument=policy)
        key = self.call("iam", "create_access_key", UserName=name)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    def env(self, credentials: Credentials) -> dict[str, str]:
        """What a process needs to reach this server with `credentials`."""
        return {**credentials.env(), "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION}

    def upload(self, bucket: str, prefix: str, folder: Path) -> None:
        """Every file under `folder` to s3://bucket/prefix/..., creating the bucket if needed."""
        creds = [self.admin.access_key_id, self.admin.secret_access_key]
        self._run(
            {
                "service": "upload",
                "endpoint": self.endpoint,
                "region": REGION,
                "creds": creds,
                "bucket": bucket,
                "prefix": prefix,
                "folder": str(folder),
            }
        )


def read_policy(bucket: str) -> str:
    """An IAM policy that lets a user list and read one bucket."""
    return (
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:ListBucket","s3:GetObject"],'
        f'"Resource":["arn:aws:s3:::{bucket}","arn:aws:s3:::{bucket}/*"]}}]}}'
    )


@contextlib.contextmanager
def s3_server(host: str = "127.0.0.1", port: int = 0, log: Path | None = None) -> Iterator[S3Server]:
    """Start moto's server on host:port (a free port when 0) and create its admin user."""
    import socket

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
    venv = server_venv()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS), "MOTO_PORT": str(port)}
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(venv / "bin" / "moto_server"), "-H", host, "-p", str(port)], env=env, stdout=out, stderr=out
    )
    endpoint = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{endpoint}/moto-api/", timeout=2).status_code < 500:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server on {endpoint} did not start (exit {process.poll()})")
            time.sleep(0.2)
        server = S3Server(process, endpoint, venv, Credentials("unused", "unused"))
        # The first requests are not authenticated: they create the admin user.
        server.call("iam", "create_user", UserName="admin")
        server.call(
            "iam", "put_user_policy", UserName="admin", PolicyName="all", PolicyDocument=_ADMIN_POLICY
        )
        key = server.call("iam", "create_access_key", UserName="admin")["AccessKey"]
        server.admin = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)
        if log:
            out.close()  # type: ignore[union-attr]
