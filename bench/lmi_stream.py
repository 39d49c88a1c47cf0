"""The per-token cost of turning vLLM's completion stream into LMI's token lines, on this CPU.

The conversion runs once per generated token on the runtime's single front-end event loop, which an
H200 saturates (docs/runtime.md, "Streaming"). Baseline, in the same process: the json module doing
the least the same conversion needs (read the event, write one line). Prints microseconds per token
for both and their ratio.

usage: python bench/lmi_stream.py [TOKENS]
"""

from __future__ import annotations

import json
import sys
import time

from lmi_runtime.lmi_schema import (
    ResponseFormat,
    StreamState,
    encode_line,
    to_completion,
    to_lmi_stream_lines,
)

# A chunk as vLLM 0.26-0.32 writes it for a stream the runtime asked for (token ids, no logprobs).
CHUNK = (
    'data: {"id":"cmpl-7b1e4e0c9a1f4d0f9b7e","object":"text_completion","created":1764500000,'
    '"model":"lmi","choices":[{"index":0,"text":" tree","logprobs":null,"finish_reason":null,'
    '"stop_reason":null,"token_ids":[5021]}]}\n\n'
)


def runtime(tokens: int) -> float:
    """Microseconds per token through the runtime's conversion and framing."""
    request = to_completion({"inputs": "the cat", "stream": True}, "lmi")
    framing = ResponseFormat()
    started = time.perf_counter()
    for _ in range(tokens):
        for line in to_lmi_stream_lines(CHUNK, request, StreamState(), str):
            framing.frame(encode_line(line))
    return (time.perf_counter() - started) / tokens * 1e6


def json_module(tokens: int) -> float:
    """Microseconds per token for json.loads of the event and json.dumps of one line."""
    started = time.perf_counter()
    for _ in range(tokens):
        choice = json.loads(CHUNK[6:])["choices"][0]
        line = {
            "index": choice["index"],
            "token": {"id": choice["token_ids"][0], "text": choice["text"], "logprob": None},
            "generated_text": None,
            "details": None,
        }
        (json.dumps(line, ensure_ascii=False) + "\n").encode()
    return (time.perf_counter() - started) / tokens * 1e6


def main() -> None:
    """Run both three times, alternating, and print the best of each and the ratio."""
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    ours, baseline = [], []
    for _ in range(3):
        baseline.append(json_module(tokens))
        ours.append(runtime(tokens))
    print(f"json module baseline: {min(baseline):.2f} us/token")
    print(f"runtime (msgspec):    {min(ours):.2f} us/token")
    print(f"runtime / baseline:   {min(ours) / min(baseline):.2f}x")


if __name__ == "__main__":
    main()
