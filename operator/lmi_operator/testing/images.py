"""Container images without Docker: a Dockerfile run with debootstrap, overlayfs and chroot into an
OCI image whose layers are cached outside the clone, keyed by what made them.

Why our own builder: no Docker engine runs on these machines and no registry is reachable, so
neither `docker build` nor buildah can pull a base image. What is reachable is Debian's package
mirror, so `FROM debian:<suite>-slim` is made by `debootstrap --variant=minbase <suite>` (the same
packages the slim image starts from), each RUN runs in a chroot over an overlay of the layers below
it (the overlay's upper folder is the new layer), and each COPY writes a layer of its own. A layer's
cache key is its parent's key plus the instruction (plus the content of a COPY's sources), as
Docker's build cache does, so a source change rebuilds only the layers from its COPY on.

Supported: FROM (`debian:<suite>[-slim]`, `scratch`, or the name of an image built here before),
RUN (shell form), COPY (sources relative to the context, Docker's directory semantics), ENV, USER,
WORKDIR, EXPOSE, ENTRYPOINT and CMD (exec form). Anything else is refused with its line number.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, cast

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
# Never part of a layer: the kernel's and the runtime's mounts.
_SKIPPED_TOPS = {"proc", "sys", "dev"}
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_BUILD_ENV_PREFIXES = (
    "PIP_",
    # uv (tools/setup-venv.sh) trusts the bundle this names; the host's is bound over the image's.
    "SSL_CERT_FILE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
# Not build inputs: interpreter caches and packaging leftovers of a checkout.
_IGNORED_NAMES = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


class ImageBuildError(RuntimeError):
    """A Dockerfile could not be built; the message names the instruction and its line."""


def image_cache_dir() -> Path:
    """Where layers and built images live: $LMI_IMAGE_CACHE, else ~/.cache/lmi-operator/images."""
    if env := os.environ.get("LMI_IMAGE_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lmi-operator" / "images"


def _log(message: str) -> None:
    print(f"[image {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class ImageConfig:
    """The runtime settings of an image (the OCI config's `config` object)."""

    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    user: str = ""
    workdir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    exposed: list[str] = field(default_factory=list)

    def to_oci(self) -> dict[str, Any]:
        """The OCI form of these settings."""
        out: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in self.env.items()]}
        if self.user:
            out["User"] = self.user
        if self.workdir:
            out["WorkingDir"] = self.workdir
        if self.entrypoint:
            out["Entrypoint"] = self.entrypoint
        if self.cmd:
            out["Cmd"] = self.cmd
        if self.exposed:
            out["ExposedPorts"] = {p if "/" in p else f"{p}/tcp": {} for p in self.exposed}
        return out

    @classmethod
    def from_oci(cls, doc: dict[str, Any]) -> ImageConfig:
        """Settings read back from an OCI config's `config` object."""
        env = dict(item.split("=", 1) for item in doc.get("Env", []))
        return cls(
            env=env,
            user=doc.get("User", ""),
            workdir=doc.get("WorkingDir", ""),
            entrypoint=list(doc.get("Entrypoint") or []),
            cmd=list(doc.get("Cmd") or []),
            exposed=[p.split("/")[0] for p in doc.get("ExposedPorts", {})],
        )


@dataclass(frozen=True)
class Layer:
    """A built layer in the cache: its folder holds `rootfs/`, `layer.tar` and `digest`."""

    key: str
    folder: Path

    @property
    def rootfs(self) -> Path:
        """The layer's files as an overlay upper folder (whiteouts as 0:0 character devices)."""
        return self.folder / "rootfs"

    @property
    def tar(self) -> Path:
        """The layer as an uncompressed OCI layer tar."""
        return self.folder / "layer.tar"

    @property
    def digest(self) -> str:
        """sha256 of layer.tar (also its diff id: the layer is not compressed)."""
        return (self.folder / "digest").read_text().strip()


@dataclass(frozen=True)
class Image:
    """A built image: its layers (bottom first) and settings, and the reference it is imported as."""

    name: str
    layers: tuple[Layer, ...]
    config: ImageConfig

    def config_blob(self) -> bytes:
        """The OCI image config document."""
        doc = {
            "architecture": "amd64",
            "os": "linux",
            "config": self.config.to_oci(),
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in self.layers]},
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def manifest_blob(self) -> bytes:
        """The OCI image manifest document."""
        config = self.config_blob()
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.tar.stat().st_size}
                for layer in self.layers
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def reference(self) -> str:
        """The fully qualified name pods use: the repository given at build time, tagged by content,
        so a changed image never hides behind a tag the node already has."""
        repository = self.name.split(":", 1)[0]
        if repository.count("/") == 0:
            repository = f"library/{repository}"
        if "." not in repository.split("/", 1)[0]:
            repository = f"docker.io/{repository}"
        return f"{repository}:{_digest(self.manifest_blob()).removeprefix('sha256:')[:16]}"

    def write_oci_archive(self, out: IO[bytes], present: Collection[str] = ()) -> None:
        """Stream the image as an OCI image layout tar (what `ctr images import` reads). Layers
        whose digest is in `present` are left out: containerd's importer ingests the blobs it is
        given and resolves the index from its store, so a layer it holds need not be sent again."""
        manifest = self.manifest_blob()
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": self.reference,
                        "org.opencontainers.image.ref.name": self.reference.rsplit(":", 1)[1],
                    },
                }
            ],
        }
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _add_bytes(tar, "index.json", json.dumps(index).encode())
            for blob in (manifest, self.config_blob()):
                _add_bytes(tar, _blob_path(_digest(blob)), blob)
            for layer in self.layers:
                if layer.digest not in present:
                    tar.add(layer.tar, arcname=_blob_path(layer.digest), recursive=False)


def _blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    line: int
    keyword: str
    argument: str

    def exec_form(self) -> list[str]:
        """The JSON array of ENTRYPOINT/CMD; the shell form is refused (it would hide signals)."""
        try:
            value = json.loads(self.argument)
        except json.JSONDecodeError:
            value = None
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ImageBuildError(f"line {self.line}: {self.keyword} must be a JSON array of strings")
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile (comments dropped, continuation lines joined)."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, argument = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), argument.strip()))
    return out


def _parse_env(argument: str) -> dict[str, str]:
    words = shlex.split(argument)
    if words and "=" not in words[0]:
        return {words[0]: argument.split(None, 1)[1] if len(words) > 1 else ""}
    return dict(word.split("=", 1) for word in words)


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)


class ImageBuilder:
    """Builds Dockerfiles into cached layers. Needs root (mount, chroot) and, for Debian bases,
    debootstrap and the Debian mirror."""

    def __init__(self, cache: Path | None = None) -> None:
        self.cache = cache or image_cache_dir()
        (self.cache / "layers").mkdir(parents=True, exist_ok=True)
        (self.cache / "built").mkdir(parents=True, exist_ok=True)

    def build(self, dockerfile: Path, context: Path, name: str) -> Image:
        """Build `dockerfile` with `context`, record it under `name` for later FROM lines, return it."""
        instructions = parse_dockerfile(dockerfile.read_text())
        if not instructions or instructions[0].keyword != "FROM":
            raise ImageBuildError(f"{dockerfile}: the first instruction must be FROM")
        layers: list[Layer] = []
        config = ImageConfig()
        key = ""
        for ins in instructions:
            where = f"{dockerfile.name} line {ins.line}"
            key = hashlib.sha256(f"{key}\n{ins.keyword} {ins.argument}".encode()).hexdigest()
            match ins.keyword:
                case "FROM":
                    if layers or config != ImageConfig():
                        raise ImageBuildError(f"{where}: only one FROM (one stage) is supported")
                    base = self._base(ins.argument, where)
                    layers, config = list(base.layers), base.config
                    key = hashlib.sha256("".join(layer.key for layer in layers).encode()).hexdigest()
                case "RUN":
                    if not layers:
                        raise ImageBuildError(f"{where}: RUN needs a base with a shell")
                    layers.append(
                        self._layer(key, where, partial(self._run, ins.argument, list(layers), config))
                    )
                case "COPY":
                    *sources, target = shlex.split(ins.argument)
                    if any(s.startswith("--") for s in sources):
                        raise ImageBuildError(f"{where}: COPY flags are not supported")
                    key = hashlib.sha256(f"{key}\n{_tree_hash(context, sources)}".encode()).hexdigest()
                    if not target.startswith("/"):
                        # As in Docker, a relative target is relative to WORKDIR.
                        target = posixpath.join(config.workdir or "/", target) + (
                            "/" if target.endswith("/") else ""
                        )
                    layers.append(self._layer(key, where, partial(_copy, context, sources, target, where)))
                case "ENV":
                    config.env |= {k: _expand(v, config.env) for k, v in _parse_env(ins.argument).items()}
                case "USER":
                    config.user = ins.argument
                case "WORKDIR":
                    config.workdir = ins.argument
                case "EXPOSE":
                    config.exposed += ins.argument.split()
                case "ENTRYPOINT":
                    # As in Docker, a new ENTRYPOINT drops the CMD inherited from the base.
                    config.entrypoint, config.cmd = ins.exec_form(), []
                case "CMD":
                    config.cmd = ins.exec_form()
                case _:
                    raise ImageBuildError(f"{where}: {ins.keyword} is not supported by this builder")
        image = Image(name, tuple(layers), config)
        record = {"layers": [layer.key for layer in layers], "config": config.to_oci()}
        self._record_path(name).write_text(json.dumps(record))
        return image

    def prune(self) -> list[str]:
        """Remove the layers no recorded image uses (older builds of a changed Dockerfile) and
        return their keys; a layer still being built (`.tmp`) is left alone."""
        used: set[str] = set()
        for record in (self.cache / "built").glob("*.json"):
            used.update(json.loads(record.read_text())["layers"])
        removed = []
        for folder in (self.cache / "layers").iterdir():
            if folder.suffix != ".tmp" and folder.name not in used:
                _remove(folder)
                removed.append(folder.name)
        return removed

    # -- FROM -----------------------------------------------------------------------------------

    def _base(self, argument: str, where: str) -> Image:
        if argument == "scratch":
            return Image("scratch", (), ImageConfig())
        if match := re.fullmatch(r"debian:([a-z]+)(-slim)?", argument):
            suite = match[1]
            key = hashlib.sha256(f"debootstrap minbase {suite} {DEBIAN_MIRROR}".encode()).hexdigest()
            layer = self._layer(key, where, lambda up: _debootstrap(suite, up))
            return Image(argument, (layer,), ImageConfig())
        record = self._record_path(argument)
        if not record.exists():
            raise ImageBuildError(
                f"{where}: FROM {argument}: not built here; FROM takes debian:<suite>[-slim], scratch, "
                "or an image built by this builder before"
            )
        doc = json.loads(record.read_text())
        layers = tuple(Layer(k, self.cache / "layers" / k) for k in doc["layers"])
        return Image(argument, layers, ImageConfig.from_oci(doc["config"]))

    def _record_path(self, name: str) -> Path:
        return self.cache / "built" / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json")

    # -- layers ---------------------------------------------------------------------------------

    def _layer(self, key: str, where: str, make: Callable[[Path], None]) -> Layer:
        folder = self.cache / "layers" / key
        if (folder / "digest").exists():
            return Layer(key, folder)
        _log(f"{where}: building layer {key[:12]}")
        started = time.monotonic()
        tmp = folder.with_name(f"{key}.tmp")
        _remove(tmp)
        (tmp / "rootfs").mkdir(parents=True)
        make(tmp / "rootfs")
        digest = hashlib.sha256()
        with (tmp / "layer.tar").open("wb") as raw:
            write_layer_tar(tmp / "rootfs", cast(IO[bytes], _HashingWriter(raw, digest)))
        (tmp / "digest").write_text(f"sha256:{digest.hexdigest()}\n")
        _remove(folder)
        tmp.rename(folder)
        size = (folder / "layer.tar").stat().st_size / 2**20
        _log(f"{where}: layer {key[:12]} done in {time.monotonic() - started:.0f} s ({size:.0f} MiB)")
        return Layer(key, folder)

    def _run(self, command: str, lowers: list[Layer], config: ImageConfig, upper: Path) -> None:
        work = upper.parent / "work"
        merged = upper.parent / "merged"
        work.mkdir()
        merged.mkdir()
        lower = ":".join(str(layer.rootfs) for layer in reversed(lowers))
        mounts: list[Path] = []
        try:
            _mount(
                ["-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}"],
                merged,
            )
            mounts.append(merged)
            for target, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--rbind", "/dev"])):
                (merged / target).mkdir(exist_ok=True)
                _mount(args, merged / target)
                mounts.append(merged / target)
            # pip's and apt's downloads are shared with the host's, not baked into the layer.
            pip_cache = Path.home() / ".cache" / "pip"
            pip_cache.mkdir(parents=True, exist_ok=True)
            (merged / "root" / ".cache" / "pip").mkdir(parents=True, exist_ok=True)
            _mount(["--bind", str(pip_cache)], merged / "root" / ".cache" / "pip")
            mounts.append(merged / "root" / ".cache" / "pip")
            # The build host's trust and package-client settings (a TLS-inspecting proxy's CA, pip's
            # index) apply to the build, as `docker build` uses the host's network; none is baked in.
            bundle = merged / HOST_CA_BUNDLE.lstrip("/")
            if Path(HOST_CA_BUNDLE).exists() and bundle.exists():
                _mount(["--bind", "-o", "ro", HOST_CA_BUNDLE], bundle)
                mounts.append(bundle)
            build_env = {k: v for k, v in os.environ.items() if k.startswith(_BUILD_ENV_PREFIXES)}
            build_env.pop("PIP_FIND_LINKS", None)
            env = {**build_env, **config.env, "HOME": "/root"}
            cwd = config.workdir or "/"
            proc = subprocess.run(
                [
                    "chroot",
                    str(merged),
                    "/bin/sh",
                    "-c",
                    f"mkdir -p {shlex.quote(cwd)} && cd {shlex.quote(cwd)} && {command}",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
            )
            if proc.returncode != 0:
                raise ImageBuildError(f"RUN {command[:120]!r} exited with {proc.returncode}")
        finally:
            for mount in reversed(mounts):
                subprocess.run(["umount", "-l", str(mount)], check=False)
            _remove(work)
            with contextlib.suppress(OSError):
                merged.rmdir()
        # The mount points made for the bind mounts are not part of what RUN did.
        for empty in (upper / "root" / ".cache" / "pip", upper / "root" / ".cache"):
            with contextlib.suppress(OSError):
                empty.rmdir()


class _HashingWriter(io.RawIOBase):
    def __init__(self, out: IO[bytes], digest: Any) -> None:
        self._out, self._digest = out, digest

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._digest.update(data)
        self._out.write(data)
        return len(data)


def write_layer_tar(rootfs: Path, out: IO[bytes]) -> None:
    """Write an overlay upper folder as an OCI layer: 0:0 character devices become `.wh.` files,
    opaque folders get `.wh..wh..opq`, owners are numeric, /proc, /sys and /dev stay empty."""

    def numeric(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for folder, dirs, files in os.walk(rootfs):
            rel = Path(folder).relative_to(rootfs)
            dirs.sort()
            if rel == Path("."):
                dirs[:] = [d for d in dirs if d not in _SKIPPED_TOPS or not (Path(folder) / d).is_dir()]
                for skipped in sorted(_SKIPPED_TOPS & set(os.listdir(folder))):
                    tar.add(Path(folder) / skipped, arcname=skipped, recursive=False, filter=numeric)
            for name in sorted(dirs) + sorted(files):
                path = Path(folder) / name
                arcname = str(rel / name)
                st = path.lstat()
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    _add_bytes(tar, str(rel / f".wh.{name}"), b"")
                    continue
                if stat.S_ISSOCK(st.st_mode):
                    continue
                tar.add(path, arcname=arcname, recursive=False, filter=numeric)
                if stat.S_ISDIR(st.st_mode):
                    with contextlib.suppress(OSError):
                        if os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y":
                            _add_bytes(tar, f"{arcname}/.wh..wh..opq", b"")


def _walk_sources(context: Path, sources: list[str]) -> Iterator[Path]:
    for source in sources:
        root = (context / source).resolve()
        if not root.is_relative_to(context.resolve()) or not root.exists():
            raise ImageBuildError(f"COPY source {source!r} is not in the build context {context}")
        if root.is_file():
            yield root
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _IGNORED_NAMES and not d.endswith(".egg-info"))
            for name in sorted(files):
                if not name.endswith(".pyc"):
                    yield Path(folder) / name


def _tree_hash(context: Path, sources: list[str]) -> str:
    digest = hashlib.sha256()
    for path in _walk_sources(context, sources):
        digest.update(f"{path.relative_to(context.resolve())}\0{path.stat().st_mode & 0o777}\0".encode())
        digest.update(path.read_bytes() if not path.is_symlink() else os.readlink(path).encode())
    return digest.hexdigest()


def _copy(context: Path, sources: list[str], target: str, where: str, upper: Path) -> None:
    dest = upper / target.lstrip("/")
    if len(sources) > 1 and not target.endswith("/"):
        raise ImageBuildError(f"{where}: COPY with several sources needs a target ending in /")
    for source in sources:
        root = (context / source).resolve()
        files = list(_walk_sources(context, [source]))
        for path in files:
            if root.is_dir():
                out = dest / path.relative_to(root)
            else:
                out = dest / path.name if target.endswith("/") else dest
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out, follow_symlinks=False)


def _debootstrap(suite: str, target: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is missing: apt-get install debootstrap (make node-deps does)")
    _log(f"debootstrap --variant=minbase {suite} (a Debian base, about 2 min)")
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", suite, str(target), DEBIAN_MIRROR],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        raise ImageBuildError(f"debootstrap {suite} failed: {proc.stdout[-2000:]}")
    # Downloaded packages are not part of the image (the slim image drops them too).
    for package in (target / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        package.unlink()


def _mount(args: list[str], target: Path) -> None:
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"mount {' '.join(args)} {target}: {proc.stderr.strip()}")


def _remove(path: Path) -> None:
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)
