#!/usr/bin/env python3
"""Checks a running `lowrank serve` with the official `openai` Python client, unchanged: the
models list, chat (plain and streaming, with usage), completions, and an API error.

  python3 tools/openai_client_check.py --base-url http://127.0.0.1:8000/v1 --model NAME [--adapter NAME]
"""
import argparse

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--api-key", default="none")
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key)
    ids = [m.id for m in client.models.list()]
    assert a.model in ids and (a.adapter is None or a.adapter in ids), ids
    print("models:", ids)
    for model in [a.model] + ([a.adapter] if a.adapter else []):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                           max_tokens=16, temperature=0)
        text = r.choices[0].message.content
        assert r.object == "chat.completion" and r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")
        print(f"chat [{model}]: {text!r} ({r.usage.prompt_tokens}+{r.usage.completion_tokens} tokens, {r.choices[0].finish_reason})")
        pieces, usage = [], None
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                                    max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == text, ("".join(pieces), text)
        assert usage and usage.completion_tokens == r.usage.completion_tokens
        print(f"stream [{model}]: {len(pieces)} chunks, same text, usage {usage.completion_tokens}")
    c = client.completions.create(model=a.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    print(f"completion: {c.choices[0].text!r}")
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        print("unknown model:", e.status_code, e.body.get("code") if isinstance(e.body, dict) else e.body)
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
