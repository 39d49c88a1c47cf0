"""Raw vLLM's OpenAI server against `lmi-runtime serve` on GPUs, same engine arguments, alternating.

Runs on the lent GPU machine (see ../shared/gpu/README.md: the vLLM bundle, make_model.py for a random
8B-shaped model and make_lora.py for a rank-8 adapter). Each case starts a raw vLLM server and a runtime
server with the same engine configuration, on two GPUs at once when there are two (otherwise one after
the other), then loads them in turn (raw, runtime, runtime, raw for every load, so drift hits both),
512 requests of 128 generated tokens (ignore_eos) at the given concurrency. Only one server is loaded
at a time; the other idles.

Cases: bf16 (streamed and not, /v1/completions and LMI's /invocations), fp8 (runtime quantization),
async (LMI's async mode at its default batch size 32, raw vLLM at --max-num-seqs 32), lora (a preloaded
adapter on both, and the base model on the same servers, so the adapter's cost is attributed), and
tp2 (the runtime on two GPUs with the engine process forked, then spawned: start-up and a load), and
stream (the runtime alone: streamed /invocations against streamed /v1/completions on the same server,
alternating, the comparison LMI streaming is held to), and coldstart (start to ready with empty caches,
then reusing them: the runtime with LMI_CACHE_DIR against raw vLLM with VLLM_CACHE_ROOT).

usage: python3 bench/gpu_runtime.py MODEL_DIR ADAPTER_DIR OUT_DIR SECONDS CASE [CASE ...]
Needs vLLM and aiohttp importable and the runtime on PYTHONPATH (runtime/). Prints one JSON line per
case (prefix RESULT) and a table of ratios (runtime / raw) at the end; writes OUT_DIR/results.jsonl.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import aiohttp

REQUESTS = 512  # per load at 128 concurrent; loads at lower concurrency send half as many
MAX_TOKENS = 128
ENGINE = {"max_model_len": "2048", "gpu_memory_utilization": "0.85", "seed": "0", "dtype": "bfloat16"}
C, INV = "/v1/completions", "/invocations"


@dataclass
class Case:
    """One comparison: raw vLLM's extra arguments, the runtime's extra LMI options, the loads."""

    raw_args: list[str]
    lmi_options: dict[str, str | None]  # None removes a default option
    loads: list[tuple[str, bool, int]]  # (route on the runtime, stream, concurrency)
    adapter: bool = False
    env: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "bf16": Case(
        ["--max-num-seqs", "256"],
        {},
        [(C, False, 128), (INV, False, 128), (C, True, 128), (INV, True, 128)],
    ),
    "fp8": Case(
        ["--max-num-seqs", "256", "--quantization", "fp8"],
        {"quantize": "fp8"},
        [(C, False, 128), (INV, False, 128)],
    ),
    # LMI's async mode leaves max_rolling_batch_size at its default (32); raw vLLM gets the same.
    "async": Case(
        ["--max-num-seqs", "32"],
        {"rolling_batch": "disable", "async_mode": "true", "max_rolling_batch_size": None},
        [(INV, False, 32), (INV, True, 32), (INV, False, 128)],
    ),
    "lora": Case(
        ["--max-num-seqs", "256", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "4"],
        {"enable_lora": "true", "max_lora_rank": "8"},
        [(C, False, 128), (INV, False, 128)],
        adapter=True,
    ),
}


def raw_command(model: str, port: int, case: Case, adapter_dir: str) -> list[str]:
    """Raw vLLM's OpenAI server with the engine arguments the runtime resolves for the case."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    command += ["--port", str(port), "--served-model-name", "lmi", "--disable-uvicorn-access-log"]
    for key, value in ENGINE.items():
        command += ["--" + key.replace("_", "-"), value]
    command += case.raw_args
    if case.adapter:
        command += ["--lora-modules", f"a1={adapter_dir}"]
    return command


def runtime_env(model: str, case: Case, adapter_dir: str) -> tuple[dict[str, str], str]:
    """OPTION_* variables as a pod receives them, and the model folder (adapters/ when LoRA)."""
    options: dict[str, str | None] = {
        "model_id": model,
        "tensor_parallel_degree": "1",
        "max_model_len": ENGINE["max_model_len"],
        "gpu_memory_utilization": ENGINE["gpu_memory_utilization"],
        "seed": ENGINE["seed"],
        "dtype": "bf16",
        "rolling_batch": "vllm",
        "max_rolling_batch_size": "256",
        "disable_uvicorn_access_log": "true",
        **case.lmi_options,
    }
    model_dir = tempfile.mkdtemp(prefix="lmi-model-")  # no config.json: the model is OPTION_MODEL_ID
    if case.adapter:
        os.makedirs(os.path.join(model_dir, "adapters"))
        os.symlink(adapter_dir, os.path.join(model_dir, "adapters", "a1"))
    env = {"OPTION_" + key.upper(): value for key, value in options.items() if value is not None}
    return env, model_dir


def body(route: str, index: int, stream: bool, lmi: bool, adapter: str | None) -> dict[str, Any]:
    """One request; on raw vLLM an /invocations load is sent as the same completion request."""
    prompt = f"the cat {index} sees the big red tree"
    if route == INV and lmi:
        payload: dict[str, Any] = {
            "inputs": prompt,
            "parameters": {"max_new_tokens": MAX_TOKENS, "ignore_eos": True},
        }
        if stream:
            payload["stream"] = True
        if adapter:
            payload["adapters"] = adapter
        return payload
    payload = {"model": adapter or "lmi", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    if stream:
        payload.update(stream=True, stream_options={"include_usage": True})
    return payload


async def one(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any], stream: bool
) -> dict[str, Any]:
    """One request's latency, time to first token and generated tokens."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                return {"ok": False, "error": f"{response.status} {(await response.text())[:200]}"}
            if not stream:
                answer = await response.json()
                if isinstance(answer, dict) and "usage" in answer:
                    tokens = answer["usage"]["completion_tokens"]
                else:  # an LMI answer: ignore_eos makes it exactly max_new_tokens
                    tokens = MAX_TOKENS
            else:
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line:
                        continue
                    first = first if first is not None else time.perf_counter() - started
                    line = line.removeprefix("data:").strip()
                    if line == "[DONE]":
                        continue
                    event = json.loads(line)
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif event.get("token"):
                        tokens += 1  # LMI's token lines: one generated token a line
    except Exception as error:
        return {"ok": False, "error": repr(error)[:200]}
    return {"ok": True, "latency": time.perf_counter() - started, "ttft": first, "tokens": tokens}


def _percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


async def load(
    port: int, route: str, stream: bool, conc: int, lmi: bool, adapter: str | None
) -> dict[str, Any]:
    """REQUESTS requests at `conc` at a time; throughput and latency percentiles."""
    url = f"http://127.0.0.1:{port}{route if lmi else C}"
    limit = asyncio.Semaphore(conc)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc), timeout=timeout) as session:

        async def go(index: int) -> dict[str, Any]:
            async with limit:
                return await one(session, url, body(route, index, stream, lmi, adapter), stream)

        started = time.perf_counter()
        results = await asyncio.gather(
            *(go(index) for index in range(REQUESTS if conc >= 128 else REQUESTS // 2))
        )
        wall = time.perf_counter() - started
    ok = [result for result in results if result["ok"]]
    ttfts = [result["ttft"] for result in ok if result["ttft"] is not None]
    summary: dict[str, Any] = {
        "ok": len(ok),
        "tok_s": round(sum(result["tokens"] for result in ok) / wall),
        "p50_s": _percentile([result["latency"] for result in ok], 0.5),
        "p99_s": _percentile([result["latency"] for result in ok], 0.99),
    }
    if ttfts:
        summary.update(ttft_p50_s=_percentile(ttfts, 0.5), ttft_p99_s=_percentile(ttfts, 0.99))
    errors = [result["error"] for result in results if not result["ok"]]
    if errors:
        summary["errors"] = errors[:3]
    return summary


@dataclass
class Server:
    """A started server process and where it answers."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    health: str
    log: str
    started: float
    ready_s: float | None = None


def start(name: str, command: list[str], env: dict[str, str], port: int, health: str, out: str) -> Server:
    """Start a server in its own process group, logging to OUT_DIR/<name>.log."""
    log = os.path.join(out, f"{name}.log")
    with open(log, "wb") as stream:
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return Server(name, process, port, health, log, time.time())


def wait_ready(servers: list[Server], deadline: float) -> None:
    """Poll every server's health route until each answers 200, exits, or the deadline passes."""
    pending = list(servers)
    while pending and time.time() < deadline:
        for server in list(pending):
            if server.process.poll() is not None:
                pending.remove(server)
                continue
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.port}{server.health}", timeout=2
                ) as answer:
                    if answer.status == 200:
                        server.ready_s = round(time.time() - server.started, 1)
                        pending.remove(server)
            except Exception:
                pass
        time.sleep(0.3)


def stop(servers: list[Server]) -> None:
    """SIGTERM each server's process group, SIGKILL what is left after 30 s."""
    for server in servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGTERM)
    for server in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    time.sleep(3)  # the engines' GPU memory is freed a little after their processes exit


def gpu_count() -> int:
    """GPUs nvidia-smi lists."""
    try:
        listing = subprocess.check_output(["nvidia-smi", "-L"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return 0
    return len([line for line in listing.splitlines() if line.startswith("GPU ")])


def tail(path: str, lines: int = 15) -> list[str]:
    """The last lines of a log, for a server that did not come up."""
    with open(path, errors="replace") as stream:
        return [line.rstrip()[:300] for line in stream.readlines()[-lines:]]


def run_case(name: str, model: str, adapter_dir: str, out: str, deadline: float, gpus: int) -> dict[str, Any]:
    """Start the case's two servers, load them alternately, stop them."""
    case = CASES[name]
    raw_env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="0")
    options, model_dir = runtime_env(model, case, adapter_dir)
    lmi_env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="1" if gpus > 1 else "0", **options)
    raw_cmd = raw_command(model, 8100, case, adapter_dir)
    lmi_cmd = [sys.executable, "-m", "lmi_runtime", "serve", "--model-dir", model_dir, "--port", "8200"]
    result: dict[str, Any] = {"case": name, "raw_cmd": " ".join(raw_cmd[3:]), "lmi_options": options}
    servers: list[Server] = []
    try:
        if gpus > 1:  # both start at once, one on each GPU
            servers = [
                start(f"{name}-raw", raw_cmd, raw_env, 8100, "/health", out),
                start(f"{name}-lmi", lmi_cmd, lmi_env, 8200, "/ping", out),
            ]
            wait_ready(servers, deadline - 60)
        else:
            for server_name, command, env, port, health in (
                (f"{name}-raw", raw_cmd, raw_env, 8100, "/health"),
                (f"{name}-lmi", lmi_cmd, lmi_env, 8200, "/ping"),
            ):
                servers.append(start(server_name, command, env, port, health, out))
                wait_ready(servers[-1:], deadline - 60)
        raw, lmi = servers
        result.update(raw_ready_s=raw.ready_s, lmi_ready_s=lmi.ready_s)
        if raw.ready_s is None or lmi.ready_s is None:
            result["failed"] = {server.name: tail(server.log) for server in servers if server.ready_s is None}
            return result
        adapter = "a1" if case.adapter else None
        for server, lmi_route in ((raw, False), (lmi, True)):  # warm-up, not measured
            asyncio.run(load(server.port, INV if lmi_route else C, False, 16, lmi_route, None))
        result["loads"] = []
        for route, stream, conc in case.loads:
            if time.time() > deadline - 40:
                result["loads"].append({"route": route, "stream": stream, "skipped": "deadline"})
                continue
            runs: dict[str, list[dict[str, Any]]] = {"raw": [], "lmi": []}
            for server, kind in ((raw, "raw"), (lmi, "lmi"), (lmi, "lmi"), (raw, "raw")):
                runs[kind].append(asyncio.run(load(server.port, route, stream, conc, kind == "lmi", adapter)))
            entry = {"route": route, "stream": stream, "conc": conc, **runs}
            if case.adapter:  # the base model on the same servers: what the adapter costs
                entry["base"] = {
                    kind: asyncio.run(load(server.port, route, stream, conc, kind == "lmi", None))
                    for server, kind in ((raw, "raw"), (lmi, "lmi"))
                }
            result["loads"].append(entry)
    finally:
        stop(servers)
    return result


def run_tp2(model: str, out: str, deadline: float) -> dict[str, Any]:
    """The runtime on two GPUs (TP 2), its engine process forked, spawned, then forked again."""
    # Eager: the start-up difference between the two methods is the processes', not compilation's.
    tp2 = Case([], {"tensor_parallel_degree": "2", "enforce_eager": "true"}, [])
    options, model_dir = runtime_env(model, tp2, "")
    result: dict[str, Any] = {"case": "tp2", "starts": []}
    for index, method in enumerate(("fork", "spawn", "fork")):
        if time.time() > deadline - 150:
            result["starts"].append({"method": method, "skipped": "deadline"})
            continue
        env = dict(
            os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="0,1", VLLM_WORKER_MULTIPROC_METHOD=method
        )
        env.update(options)
        command = [sys.executable, "-m", "lmi_runtime", "serve", "--model-dir", model_dir, "--port", "8300"]
        server = start(f"tp2-{index}-{method}", command, env, 8300, "/ping", out)
        try:
            wait_ready([server], deadline - 40)
            entry: dict[str, Any] = {"method": method, "ready_s": server.ready_s}
            if server.ready_s is None:
                entry["failed"] = tail(server.log)
            else:
                entry["load"] = asyncio.run(load(8300, INV, False, 128, True, None))
            result["starts"].append(entry)
        finally:
            stop([server])
    return result


def run_stream(model: str, out: str, deadline: float) -> dict[str, Any]:
    """Streamed LMI /invocations against streamed /v1/completions on one runtime server, alternating."""
    options, model_dir = runtime_env(model, Case([], {}, []), "")
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="0", **options)
    command = [sys.executable, "-m", "lmi_runtime", "serve", "--model-dir", model_dir, "--port", "8200"]
    server = start("stream-lmi", command, env, 8200, "/ping", out)
    result: dict[str, Any] = {"case": "stream"}
    try:
        wait_ready([server], deadline - 40)
        result["lmi_ready_s"] = server.ready_s
        if server.ready_s is None:
            result["failed"] = tail(server.log)
            return result
        asyncio.run(load(8200, INV, False, 16, True, None))  # warm-up, not measured
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "lmi": []}
        # "raw" here is the same server's own OpenAI stream: the comparison is route against route.
        for route, kind in ((C, "raw"), (INV, "lmi"), (INV, "lmi"), (C, "raw"), (C, "raw"), (INV, "lmi")):
            runs[kind].append(asyncio.run(load(8200, route, True, 128, True, None)))
        result["loads"] = [{"route": "/invocations vs /v1/completions", "stream": True, "conc": 128, **runs}]
    finally:
        stop([server])
    return result


def _caches_in(root: str, env: dict[str, str]) -> dict[str, str]:
    """`env` with every cache a pod would keep on its cache volume under `root` (HOME and XDG too:
    Triton and FlashInfer keep their JIT caches there)."""
    os.makedirs(root, exist_ok=True)
    return dict(
        env, HOME=root, XDG_CACHE_HOME=root, VLLM_CACHE_ROOT=os.path.join(root, "vllm"), LMI_CACHE_DIR=root
    )


def run_coldstart(model: str, out: str, deadline: float, gpus: int) -> dict[str, Any]:
    """Start to ready with empty caches, then again with the same caches, for the runtime (with
    LMI_CACHE_DIR: its keyed compile cache) and raw vLLM (VLLM_CACHE_ROOT), compiled (not eager).
    With two GPUs the runtime's starts run on GPU 1 while raw vLLM's run on GPU 0."""
    options, model_dir = runtime_env(model, Case([], {}, []), "")
    base = dict(os.environ, PYTHONUNBUFFERED="1")
    root = tempfile.mkdtemp(prefix="coldstart-", dir=out)
    lmi_cmd = [sys.executable, "-m", "lmi_runtime", "serve", "--model-dir", model_dir, "--port", "8200"]
    raw_cmd = raw_command(model, 8100, Case(["--max-num-seqs", "256"], {}, []), "")
    result: dict[str, Any] = {"case": "coldstart", "starts": []}
    for attempt in ("cold", "warm"):
        if time.time() > deadline - 300:
            result["starts"].append({"attempt": attempt, "skipped": "deadline"})
            continue
        lmi_env = _caches_in(os.path.join(root, "lmi"), base) | options
        lmi_env |= {"CUDA_VISIBLE_DEVICES": "1" if gpus > 1 else "0"}
        raw_env = _caches_in(os.path.join(root, "raw"), base) | {"CUDA_VISIBLE_DEVICES": "0"}
        servers = [
            start(f"coldstart-{attempt}-lmi", lmi_cmd, lmi_env, 8200, "/ping", out),
            start(f"coldstart-{attempt}-raw", raw_cmd, raw_env, 8100, "/health", out),
        ]
        try:
            if gpus > 1:
                wait_ready(servers, deadline - 30)
            else:
                for server in servers:  # one at a time on one GPU
                    wait_ready([server], deadline - 30)
            entry: dict[str, Any] = {"attempt": attempt}
            for server in servers:
                entry[f"{server.name.rsplit('-', 1)[1]}_ready_s"] = server.ready_s
            with (
                contextlib.suppress(Exception),
                urllib.request.urlopen("http://127.0.0.1:8200/startup", timeout=2) as answer,
            ):
                entry["lmi_phases_s"] = json.loads(answer.read())["seconds"]
            result["starts"].append(entry)
        finally:
            stop(servers)
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def ratios(result: dict[str, Any]) -> list[str]:
    """Table rows: runtime/raw throughput and time-to-first-token p99 for every load of a case."""
    rows = []
    for entry in result.get("loads", []):
        if "raw" not in entry:
            continue
        raw = _mean([run["tok_s"] for run in entry["raw"]])
        lmi = _mean([run["tok_s"] for run in entry["lmi"]])
        ttft = ""
        if entry["stream"]:
            raw_ttft = _mean([run.get("ttft_p99_s") or 0 for run in entry["raw"]])
            lmi_ttft = _mean([run.get("ttft_p99_s") or 0 for run in entry["lmi"]])
            ttft = f"{lmi_ttft:.2f} / {raw_ttft:.2f} s"
        label = f"{'streamed ' if entry['stream'] else ''}{entry['route']} @{entry['conc']}"
        rows.append(f"| {result['case']} | {label} | {raw:.0f} | {lmi:.0f} | {lmi / raw:.3f} | {ttft} |")
        if "base" in entry:
            base_raw, base_lmi = entry["base"]["raw"]["tok_s"], entry["base"]["lmi"]["tok_s"]
            rows.append(
                f"| {result['case']} | base model, {label} | {base_raw} | {base_lmi} | "
                f"{base_lmi / base_raw:.3f} | adapter/base raw {raw / base_raw:.2f}, "
                f"runtime {lmi / base_lmi:.2f} |"
            )
    return rows


def main() -> None:
    """Run the named cases within SECONDS; print RESULT lines and the ratio table."""
    model, adapter_dir, out, seconds, names = (
        sys.argv[1],
        sys.argv[2],
        sys.argv[3],
        float(sys.argv[4]),
        sys.argv[5:],
    )
    deadline = time.time() + seconds
    os.makedirs(out, exist_ok=True)
    gpus = gpu_count()
    print(f"{gpus} GPU(s); cases {names}", flush=True)
    table = [
        "| case | load | raw tok/s | runtime tok/s | runtime/raw | TTFT p99 runtime / raw |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        if name == "tp2":
            result = run_tp2(model, out, deadline)
        elif name == "stream":
            result = run_stream(model, out, deadline)
        elif name == "coldstart":
            result = run_coldstart(model, out, deadline, gpus)
        else:
            result = run_case(name, model, adapter_dir, out, deadline, gpus)
        print("RESULT " + json.dumps(result), flush=True)
        with open(os.path.join(out, "results.jsonl"), "a") as stream:
            stream.write(json.dumps(result) + "\n")
        table += ratios(result)
    print("\n".join(table), flush=True)


if __name__ == "__main__":
    main()
