"""Load test of an OpenAI-compatible server with per-request LoRA adapters, for comparing
`lowrank serve` with llama.cpp's server on the same mixed load (standard library only).

C clients each send streaming chat requests one after another until N requests are spent; request
i uses adapter i mod K. How a request names its adapter:
  --select model     "model": NAME (lowrank serve, vLLM)
  --select llamacpp  "lora": [{"id": k, "scale": 1}] (llama.cpp's server; unlisted adapters get 0)
Every request asks for `ignore_eos` (honoured by lowrank, llama.cpp's server and vLLM), so each
generates exactly --max-tokens and the servers are compared on the same work, not on where each
model happens to end its answers. Prints one JSON line: aggregate generated tokens/s, time to
first token and inter-token gaps (p50/p99, seconds) and errors.

    python tools/serve_load.py --url http://127.0.0.1:8000 --select model --adapters iso,euro -c 16 -n 64
"""

import argparse
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlparse

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "Describe a walk through a forest in autumn.",
    "Tell me about the history of the printing press.",
]


def one_request(url, body):
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    start = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first, last, gaps, pieces, usage = None, start, [], 0, None
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            usage = event["usage"].get("completion_tokens")
        choices = event.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            now = time.monotonic()
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last, pieces = now, pieces + 1
    conn.close()
    return first or 0.0, gaps, usage if usage is not None else pieces


def percentile(v, p):
    if not v:
        return 0.0
    v = sorted(v)
    return v[round((len(v) - 1) * p)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--select", choices=["model", "llamacpp"], required=True)
    ap.add_argument("--model", default="base", help="the model name for requests without an adapter")
    ap.add_argument("--adapters", default="", help="comma-separated adapter names (model) or count (llamacpp ids 0..K-1)")
    ap.add_argument("-c", "--clients", type=int, default=16)
    ap.add_argument("-n", "--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    if a.select == "model":
        names = [x for x in a.adapters.split(",") if x]
    else:
        names = list(range(int(a.adapters or 0)))
    lock = threading.Lock()
    next_request = [0]
    ttfts, gaps, tokens, errors = [], [], [0], []

    def client():
        while True:
            with lock:
                i = next_request[0]
                if i >= a.requests:
                    return
                next_request[0] += 1
            body = {"model": a.model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            if names:
                k = names[i % len(names)]
                if a.select == "model":
                    body["model"] = k
                else:
                    body["lora"] = [{"id": j, "scale": 1.0 if j == k else 0.0} for j in names]
            try:
                t, g, n = one_request(a.url, body)
                with lock:
                    ttfts.append(t)
                    gaps.extend(g)
                    tokens[0] += n
            except Exception as e:  # counted and reported, the load goes on
                with lock:
                    errors.append(str(e))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    print(json.dumps({
        "select": a.select, "clients": a.clients, "adapters": len(names), "requests": a.requests,
        "generated_tokens": tokens[0], "wall_s": round(wall, 2), "tokens_per_s": round(tokens[0] / wall, 1),
        "ttft_p50": round(percentile(ttfts, 0.5), 3), "ttft_p99": round(percentile(ttfts, 0.99), 3),
        "itl_p50": round(percentile(gaps, 0.5), 4), "itl_p99": round(percentile(gaps, 0.99), 4),
        "errors": len(errors), "first_error": errors[0] if errors else None,
    }))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
