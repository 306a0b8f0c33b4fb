"""Load test for `tunelab serve`: total tokens/s and p50/p95 latency at 1, 4 and 16 clients.

The same model is served twice by the real CLI: with batching (--max-batch 16) and one request
at a time (--max-batch 1). Each client sends chat requests back to back (greedy, fixed
max_tokens), so both servers produce the same answers and the same token counts.

    python bench/serve_load.py                       # SmolLM2-135M-Instruct, 64 tokens per answer
    python bench/serve_load.py --model /path/to/hf_folder --clients 1 4 --max-tokens 16
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a library", "coffee", "mountains", "a train ride", "winter", "bees", "the moon",
          "a city at night", "gardening", "chess", "rain", "bread", "a violin", "deserts", "a lighthouse"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, dtype: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--dtype", dtype, "--max-queue", "256"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the server did not start (exit {proc.poll()})")
        try:
            models = httpx.get(url + "/v1/models").json()["data"]
            return proc, url, models[0]["id"]
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.5)


def run_level(url: str, model: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(c: int):
        with httpx.Client(timeout=600) as http:
            for r in range(requests_per_client):
                topic = TOPICS[(c * requests_per_client + r) % len(TOPICS)]
                body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": f"Write a short poem about {topic}."}]}
                t0 = time.perf_counter()
                resp = http.post(url + "/v1/chat/completions", json=body)
                resp.raise_for_status()
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    tokens[0] += resp.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "requests": len(latencies), "tokens": tokens[0], "wall_s": wall,
            "tok_s": tokens[0] / wall, "p50_s": statistics.median(latencies), "p95_s": q[18]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-batch", type=int, default=16, help="the batched server's batch size")
    a = ap.parse_args(argv)

    results = {}
    for label, max_batch in (("batched", a.max_batch), ("one at a time", 1)):
        proc, url, model = start_server(a.model, max_batch, a.dtype)
        try:
            run_level(url, model, 1, 1, 4)  # warm-up
            for c in a.clients:
                r = run_level(url, model, c, a.requests_per_client, a.max_tokens)
                results[(label, c)] = r
                print(f"{label:14} clients {c:3}: {r['tok_s']:7.1f} tokens/s  p50 {r['p50_s']:6.2f} s  "
                      f"p95 {r['p95_s']:6.2f} s  ({r['requests']} requests, {r['tokens']} tokens, "
                      f"{r['wall_s']:.1f} s)", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)

    print(f"\nmodel {a.model}, max_tokens {a.max_tokens}, greedy, {a.requests_per_client} requests per client; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| clients | batched tokens/s | p50 s | p95 s | one-at-a-time tokens/s | p50 s | p95 s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for c in a.clients:
        b, s = results[("batched", c)], results[("one at a time", c)]
        print(f"| {c} | {b['tok_s']:.1f} | {b['p50_s']:.2f} | {b['p95_s']:.2f} | {s['tok_s']:.1f} | "
              f"{s['p50_s']:.2f} | {s['p95_s']:.2f} | {b['tok_s'] / s['tok_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
