"""Serving benchmark: N concurrent chat requests of up to M new tokens against an OpenAI-compatible server, over HTTP.

The requests are what the LLM2LLM teacher sends: the GSM8K task's teacher messages for seed questions from --data
(built-in questions if that file is missing), sampled at temperature 0.7 with one seed per request. Prints one JSON
line: aggregate output tok/s (completion tokens of all replies / wall time from the first request to the last
reply), p50 and p95 request latency, requests/s.

    python bench/bench_serve.py                                       # embedded server, SmolLM2-135M-Instruct
    python bench/bench_serve.py --requests 8 --max-tokens 64          # small, for a CPU
    python bench/bench_serve.py --config smollm2-135m --device cuda --dtype bf16    # random weights of that shape
    python bench/bench_serve.py --url http://127.0.0.1:8000/v1 --model NAME         # any running server

Without --url it starts serve.py's embedded server in this process (continuous batching for Llama-family models).
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import serve  # noqa: E402
from bench_decode import SHAPES, load  # noqa: E402
from generate import generate  # noqa: E402
from tasks import get_task  # noqa: E402

BUILT_IN = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
            "clips did Natalia sell altogether in April and May?",
            "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did "
            "she earn?",
            "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her "
            "parents give her $15 and her grandparents twice as much as her parents. How much more money does Betty "
            "need to buy the wallet?",
            "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?"]


def teacher_requests(path, n):
    task = get_task("gsm8k")
    if os.path.exists(path):
        rows = [json.loads(line) for line, _ in zip(open(path), range(max(n, 1)))]
    else:
        rows = [{"question": q, "answer": "#### 0"} for q in BUILT_IN]
    rows = [dict(rows[i % len(rows)], id=f"bench-{i}") for i in range(n)]
    return [task.teacher_messages(row, 1) for row in rows]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="base URL of a running OpenAI-compatible server (ending in /v1); default: start "
                                 "the embedded server")
    p.add_argument("--model", help="with --url: the model name to ask for; else a model folder (default: "
                                   "SmolLM2-135M-Instruct from ../shared/models/smollm2.sh)")
    p.add_argument("--config", choices=sorted(SHAPES), help="embedded server: a random model of this shape")
    p.add_argument("--tokenizer", help="tokenizer folder for --config (default: SmolLM2's)")
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "gsm8k", "train.jsonl"),
                   help="GSM8K-style JSONL of seed questions (built-in questions if missing)")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests, all sent at once")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-batch", type=int, default=None, help="embedded server: most rows decoded together "
                                                               "(default: --requests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()

    server, name = None, args.model
    if not args.url:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model, tokenizer, name = load(args, torch.device(args.device), dtype)
        server = serve.make_server(model, tokenizer, generate, model_name=name,
                                   max_batch=args.max_batch or args.requests)
        serve.start_background(server)
    url = (args.url or server.url).rstrip("/")
    messages = teacher_requests(args.data, args.requests)

    def ask(i, max_tokens=args.max_tokens):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/chat/completions", timeout=3600, json={
            "model": name or "default", "messages": messages[i], "max_tokens": max_tokens,
            "temperature": args.temperature, "seed": i})
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    try:
        ask(0, 4)  # warm-up (allocator, lazy imports, graph capture) outside the timed run
        with ThreadPoolExecutor(args.requests) as pool:
            t0 = time.perf_counter()
            results = list(pool.map(ask, range(args.requests)))
            seconds = time.perf_counter() - t0
    finally:
        if server is not None:
            server.shutdown()
            server.worker.join(10)
    latencies = [s for s, _ in results]
    tokens = sum(n for _, n in results)
    print(json.dumps({
        "bench": "serve", "server": args.url or "embedded", "model": name, "device": args.device if server else None,
        "dtype": args.dtype if server else None, "threads": torch.get_num_threads() if server else None,
        "requests": args.requests, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "output_tokens": tokens, "seconds": round(seconds, 2), "output_tok_s": round(tokens / seconds, 1),
        "p50_latency_s": round(percentile(latencies, 50), 2), "p95_latency_s": round(percentile(latencies, 95), 2),
        "requests_s": round(args.requests / seconds, 3)}))


if __name__ == "__main__":
    main()
