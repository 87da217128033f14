"""`loraforge serve` under load: throughput and latency at concurrency 1, 16 and 64, and a 200-request burst.

    python bench/serve_load.py                 # the recorded run (bench/RESULTS.md)
    python bench/serve_load.py --quick         # fewer requests, a look in ~1 minute

The server runs as its own process (`loraforge serve`, default model, fp32, 8 adapters r=16 all-linear, B non-zero,
--max-batch 16 --max-queue 64), on 127.0.0.1. Clients are asyncio + httpx in this process, streaming
/v1/completions so that the first token's arrival is seen: prompt "Write a short note about topic number i:",
64 new tokens (`ignore_eos`, vLLM's extension, so every request makes exactly 64), greedy.

Printed:
1. per scenario (8 adapters mixed, concurrency 1, 16, 64; the base only, concurrency 1 and 16): aggregate generated
   tokens/s, p50/p99 time to first token, p50/p99 total latency; the ratios the issue asks for: 16 clients against
   one at a time, 8 adapters against the base only, and one client's time per output token against
   `loraforge generate` (the engine in this process, one prompt, before the server starts);
2. the load test: 200 requests at once over the 8 adapters and the base, the queue bound (16 rows + 64 waiting)
   smaller than 200: how many got 200 and 429, anything else, and how many greedy answers differ from the same
   request decoded offline (each must be 0), and the server's peak RSS.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_adapter import make_adapters  # noqa: E402  (same adapters as the multi-adapter benchmark)

KEY = "bench-key"
NEW = 64
N_ADAPTERS = 8


def prompt(i: int) -> str:
    return f"Write a short note about topic number {i}:"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def one(client: httpx.AsyncClient, url: str, model: str, i: int) -> dict:
    """One streamed completion: status, text, time to first token, total time."""
    body = {"model": model, "prompt": prompt(i), "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start = time.perf_counter()
    first, text = None, []
    async with client.stream("POST", url + "/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
    return {"status": 200, "text": "".join(text), "ttft": first, "total": time.perf_counter() - start}


async def scenario(url: str, models: list[str], clients: int, per_client: int) -> dict:
    """`clients` clients, each sending `per_client` requests one after another, round-robin over `models`."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as client:
        async def worker(c: int) -> list[dict]:
            return [await one(client, url, models[(c * per_client + k) % len(models)], c * per_client + k)
                    for k in range(per_client)]
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    assert len(ok) == len(results), f"{len(results) - len(ok)} requests failed: {results}"
    return {"tok_s": NEW * len(ok) / wall, "ttft": [r["ttft"] for r in ok], "total": [r["total"] for r in ok],
            "requests": len(ok)}


async def burst(url: str, models: list[str], n: int) -> list[tuple[str, int, dict]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 8)) as client:
        results = await asyncio.gather(*(one(client, url, models[i % len(models)], i % 8) for i in range(n)))
    return [(models[i % len(models)], i % 8, r) for i, r in enumerate(results)]


def offline_answers(store: Path, models: list[str], base_name: str) -> tuple[dict, float]:
    """{(model, prompt i): text} decoded by the engine in this process, and `loraforge generate`'s seconds per
    token for one prompt on the base (the single-client reference)."""
    from loraforge.infer import InferenceSession, SamplingParams, generate_many
    from loraforge.infer.store import AdapterStore

    session = InferenceSession.open(base_name)
    adapters = AdapterStore(store, session)
    tok = session.tokenizer
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    one_prompt = tok(prompt(0))["input_ids"]
    generate_many(session, [one_prompt], SamplingParams(max_new_tokens=4), [None])  # warm-up
    start = time.perf_counter()
    generate_many(session, [one_prompt], params, [None])
    per_token = (time.perf_counter() - start) / NEW
    pairs = [(m, i) for m in models for i in range(8)]
    answers = {}
    for k in range(0, len(pairs), 16):
        chunk = pairs[k:k + 16]
        names = adapters.ensure([None if m == base_name else m for m, _ in chunk])
        outs = generate_many(session, [tok(prompt(i))["input_ids"] for _, i in chunk], params, names)
        for pair, ids in zip(chunk, outs):
            answers[pair] = tok.decode(ids, skip_special_tokens=True)
    return answers, per_token


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli", "serve", "--adapters", str(store), "--port", "0",
                             "--max-batch", "16", "--max-queue", "64"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LORAFORGE_API_KEY": KEY})
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"the server did not start (exit {proc.wait()})")
    return proc, line.split(" on ")[1].split()[0].removesuffix("/v1")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per scenario")
    parser.add_argument("--burst", type=int, default=200)
    args = parser.parse_args()
    from loraforge.config import DEFAULT_MODEL
    from loraforge.models import load_model

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    base, _ = load_model(DEFAULT_MODEL)
    make_adapters(tmp / "store", N_ADAPTERS, base)
    del base
    adapters = [f"user{k}" for k in range(N_ADAPTERS)]
    answers, generate_per_token = offline_answers(tmp / "store", adapters + [DEFAULT_MODEL], DEFAULT_MODEL)

    proc, url = start_server(tmp / "store")
    try:
        asyncio.run(scenario(url, adapters, 1, 1))  # warm-up
        rounds = 1 if args.quick else 2
        runs = {
            ("8 adapters", 1): asyncio.run(scenario(url, adapters, 1, 4 * rounds)),
            ("8 adapters", 16): asyncio.run(scenario(url, adapters, 16, rounds)),
            ("8 adapters", 64): asyncio.run(scenario(url, adapters, 64, 1)),
            ("base only", 1): asyncio.run(scenario(url, [DEFAULT_MODEL], 1, 2 * rounds)),
            ("base only", 16): asyncio.run(scenario(url, [DEFAULT_MODEL], 16, rounds)),
        }
        print(f"\n## serving: default model fp32, {N_ADAPTERS} adapters r=16 all-linear, {NEW} new tokens a request, "
              "greedy, streamed, --max-batch 16")
        print("| requests to | clients | requests | tokens/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 |")
        print("|---|---|---|---|---|---|---|---|")
        for (what, c), r in runs.items():
            print(f"| {what} | {c} | {r['requests']} | {r['tok_s']:.1f} | {percentile(r['ttft'], .5):.2f} s | "
                  f"{percentile(r['ttft'], .99):.2f} s | {percentile(r['total'], .5):.2f} s | "
                  f"{percentile(r['total'], .99):.2f} s |")
        mixed16, base16 = runs[("8 adapters", 16)]["tok_s"], runs[("base only", 16)]["tok_s"]
        one_client = runs[("base only", 1)]
        tpot = statistics.median((t - f) / (NEW - 1) for t, f in zip(one_client["total"], one_client["ttft"]))
        print(f"\n16 clients vs one at a time (8 adapters): {mixed16 / runs[('8 adapters', 1)]['tok_s']:.2f}x "
              "(goal >= 5x)")
        print(f"8 adapters vs base only, 16 clients: {mixed16 / base16:.3f}x (goal >= 0.85x)")
        print(f"one client, base: {1e3 * tpot:.1f} ms per output token vs loraforge generate "
              f"{1e3 * generate_per_token:.1f} ms: {tpot / generate_per_token:.2f}x (goal <= 1.2x)")

        models = adapters + [DEFAULT_MODEL]
        start = time.perf_counter()
        results = asyncio.run(burst(url, models, args.burst))
        wall = time.perf_counter() - start
        codes: dict[int, int] = {}
        for _, _, r in results:
            codes[r["status"]] = codes.get(r["status"], 0) + 1
        wrong = [(m, i) for m, i, r in results if r["status"] == 200 and r["text"] != answers[(m, i)]]
        print(f"\n## load test: {args.burst} requests at once over {N_ADAPTERS} adapters and the base, "
              "queue bound 16 rows + 64 waiting")
        print(f"answered 200: {codes.get(200, 0)}, 429: {codes.get(429, 0)}, other: "
              f"{sum(n for c, n in codes.items() if c not in (200, 429))}; mismatches against offline: {len(wrong)}"
              f"{' ' + str(wrong[:5]) if wrong else ''}; {wall:.1f} s; server peak RSS {peak_rss_mb(proc.pid):.0f} MB")
    finally:
        proc.send_signal(signal.SIGTERM)
        print(f"server stopped with SIGTERM: exit code {proc.wait(timeout=120)}")


if __name__ == "__main__":
    main()
