"""Tests for serve.py: the OpenAI-compatible server, over real HTTP on 127.0.0.1.

Two kinds of model behind it:
  * a tiny random Llama (2 layers, hidden 64) with a real byte-level BPE tokenizer and a ChatML template, saved and
    reloaded through from_pretrained, decoded by llm2llm.generate when it exists (else by a reference decoder on
    Hugging Face model.generate that honours the same contract): shapes, usage, greedy output, seeds;
  * a scripted generate_fn with no model at all: batching, routing of replies, errors, bad requests.

Run: python -m pytest -q tests/test_serve.py
"""

import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import serve  # noqa: E402
import teacher  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]

# -----------------------------------------------------------------------------
# A tiny real model, built offline


def reference_generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=32, temperature=0.0, top_p=1.0,
                       seed=None, stop=None, details=False):
    """The decoder contract on Hugging Face generate, one row at a time (so each row's seed alone decides it)."""
    outs = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        row_seed = seed[i] if isinstance(seed, list) else seed
        if row_seed is not None:
            torch.manual_seed(row_seed)
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kw)
        new = gen[0, ids["input_ids"].shape[1]:].tolist()
        ended = tokenizer.eos_token_id in new
        text = tokenizer.decode(new, skip_special_tokens=True)
        for s in stop or []:
            if s in text:
                text, ended = text[:text.index(s)], True
        outs.append({"text": text, "prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": len(new),
                     "finish_reason": "stop" if ended else "length"})
    return outs if details else [o["text"] for o in outs]


def project_generate():
    try:
        import llm2llm
        return llm2llm.generate
    except (ImportError, AttributeError):
        return reference_generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["You are terse. Name a prime number. Two, three, five and seven are prime.",
              "The quick brown fox jumps over the lazy dog. 0123456789"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_server(tiny):
    model, tokenizer = tiny
    server = serve.make_server(model, tokenizer, project_generate(), model_name="tiny-llama", max_batch=8)
    serve.start_background(server)
    yield server
    server.shutdown()


def chat(server, **body):
    body.setdefault("messages", MESSAGES)
    return requests.post(server.url + "/chat/completions", json=body, timeout=60)


def test_chat_completion_has_the_openai_shape_and_greedy_matches_hf(tiny, tiny_server):
    model, tokenizer = tiny
    r = chat(tiny_server, model="anything", temperature=0, max_tokens=8)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["model"] == "tiny-llama"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")

    # Independent reference: the chat template and Hugging Face greedy decoding, by hand.
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = gen[0, ids["input_ids"].shape[1]:]
    assert choice["message"]["content"] == tokenizer.decode(new, skip_special_tokens=True)
    assert choice["finish_reason"] == ("stop" if tokenizer.eos_token_id in new.tolist() else "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == ids["input_ids"].shape[1]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_n_samples_and_seeds_are_reproducible(tiny_server):
    two = chat(tiny_server, temperature=1.0, max_tokens=12, n=2, seed=1234).json()["choices"]
    assert [c["index"] for c in two] == [0, 1]
    again = chat(tiny_server, temperature=1.0, max_tokens=12, n=2, seed=1234).json()["choices"]
    assert [c["message"]["content"] for c in again] == [c["message"]["content"] for c in two]
    # Sample k of a request is seeded seed + k, so it equals a single sample asked with that seed.
    single = chat(tiny_server, temperature=1.0, max_tokens=12, seed=1235).json()["choices"][0]
    assert single["message"]["content"] == two[1]["message"]["content"]
    others = {chat(tiny_server, temperature=1.0, max_tokens=12, seed=s).json()["choices"][0]["message"]["content"]
              for s in (1, 2, 3)}
    assert len(others | {two[0]["message"]["content"]}) > 1  # the seed actually changes the sample


def test_models_listing_and_teacher_client_end_to_end(tiny_server, tmp_path):
    assert teacher.check_reachable(tiny_server.url) == ["tiny-llama"]
    t = teacher.Teacher(tiny_server.url, "tiny-llama", cache_dir=str(tmp_path), workers=3, max_tokens=6,
                        temperature=1.0, backoff=0.01)
    jobs = [{"messages": MESSAGES, "sample": i} for i in range(3)] + [{"messages": MESSAGES, "n": 2}]
    res = t.chat_many(jobs, progress=False)
    assert all(r["error"] is None for r in res) and [len(r["choices"]) for r in res] == [1, 1, 1, 2]
    assert t.requests == 4 and t.completion_tokens > 0 and t.prompt_tokens == 4 * res[0]["prompt_tokens"]

# -----------------------------------------------------------------------------
# Batching, routing and failure, with a scripted generate_fn (no model needed)


class PlainTokenizer:
    chat_template = None  # a base model: the server falls back to a "role: content" transcript


@pytest.fixture
def scripted():
    """A server whose generate_fn echoes each prompt's last line and records every call it gets."""
    state = {"calls": [], "active": 0, "max_active": 0, "gate": threading.Event(), "fail_at": set()}
    state["gate"].set()
    lock = threading.Lock()

    def generate_fn(model, tokenizer, prompts, max_new_tokens=256, batch_size=32, temperature=0.0, top_p=1.0,
                    seed=None, stop=None, details=False):
        with lock:
            state["active"] += 1
            state["max_active"] = max(state["max_active"], state["active"])
            state["calls"].append({"prompts": list(prompts), "seed": seed, "temperature": temperature,
                                   "top_p": top_p, "max_new_tokens": max_new_tokens, "stop": stop})
        try:
            state["gate"].wait(10)
            time.sleep(0.01)
            if temperature in state["fail_at"]:
                raise RuntimeError("CUDA out of memory (scripted)")
            return [{"text": f"{p.splitlines()[-2]}|seed={s}|t={temperature}", "prompt_tokens": len(p),
                     "completion_tokens": 3, "finish_reason": "length"} for p, s in zip(prompts, seed)]
        finally:
            with lock:
                state["active"] -= 1

    server = serve.make_server(object(), PlainTokenizer(), generate_fn, model_name="scripted", max_batch=16)
    serve.start_background(server)
    yield server, state
    server.shutdown()


def ask(server, text, **body):
    return chat(server, messages=[{"role": "user", "content": text}], **body)


def test_plain_transcript_without_chat_template_and_options_reach_generate(scripted):
    server, state = scripted
    r = ask(server, "hi there", max_tokens=5, max_completion_tokens=7, stop="\n\n", seed=9, temperature=0.5,
            top_p=0.8)
    assert r.status_code == 200
    call = state["calls"][-1]
    assert call["prompts"] == ["user: hi there\nassistant:"]
    assert (call["max_new_tokens"], call["stop"], call["seed"], call["temperature"], call["top_p"]) == \
        (7, ["\n\n"], [9], 0.5, 0.8)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    ask(server, "again")
    assert state["calls"][-1]["stop"] is None and state["calls"][-1]["max_new_tokens"] == serve.DEFAULT_MAX_TOKENS
    # No seed asked: a fresh one each time, so unseeded samples differ.
    ask(server, "x", n=1)
    ask(server, "x", n=1)
    assert state["calls"][-1]["seed"] != state["calls"][-2]["seed"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_reply(scripted):
    server, state = scripted
    state["gate"].clear()  # hold the model on the first request until all the others are queued behind it

    def wait_until(condition):
        deadline = time.time() + 10
        while not condition() and time.time() < deadline:
            time.sleep(0.005)

    with ThreadPoolExecutor(8) as pool:
        kw = [dict(n=1 + i % 2, seed=100 * i, temperature=0.7 if i < 6 else 0.0) for i in range(8)]
        futures = [pool.submit(ask, server, "question 0", **kw[0])]
        wait_until(lambda: len(state["calls"]) == 1)
        futures += [pool.submit(ask, server, f"question {i}", **kw[i]) for i in range(1, 8)]
        wait_until(lambda: server.jobs.qsize() == 7)
        state["gate"].set()
        replies = [f.result() for f in futures]
    for i, r in enumerate(replies):
        assert r.status_code == 200
        texts = [c["message"]["content"] for c in r.json()["choices"]]
        t = 0.7 if i < 6 else 0.0
        assert texts == [f"user: question {i}|seed={100 * i + k}|t={t}" for k in range(1 + i % 2)]
        assert r.json()["usage"]["completion_tokens"] == 3 * len(texts)
    assert state["max_active"] == 1  # the model is never used by two threads at once
    # Everything queued behind the first request went in ONE batch, one generate call per temperature (rows
    # decode together only with the same settings): 3 calls for 8 requests.
    assert [len(c["prompts"]) for c in state["calls"]] == [1, 8, 3]  # rows: n = 1 + i % 2
    assert [c["temperature"] for c in state["calls"]] == [0.7, 0.7, 0.0]


def test_generation_error_is_a_500_for_its_own_requests_only(scripted):
    server, state = scripted
    state["fail_at"] = {0.3}
    r = ask(server, "boom", temperature=0.3)
    assert r.status_code == 500
    assert "out of memory" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
    # In one batch, a failing group must not take down the other group's requests.
    state["gate"].clear()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(ask, server, "first", temperature=0.9)
        deadline = time.time() + 10
        while len(state["calls"]) < 2 and time.time() < deadline:
            time.sleep(0.005)
        bad, good = pool.submit(ask, server, "bad", temperature=0.3), pool.submit(ask, server, "good")
        while server.jobs.qsize() < 2 and time.time() < deadline:
            time.sleep(0.005)
        state["gate"].set()
        assert (first.result().status_code, bad.result().status_code, good.result().status_code) == (200, 500, 200)
    assert [c["temperature"] for c in state["calls"]] == [0.3, 0.9, 0.3, 1.0]
    state["fail_at"] = set()
    assert ask(server, "fine", temperature=0.3).status_code == 200


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"prompt": "hello"}, "messages"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 3}]}, "content"),
    ({"messages": MESSAGES, "n": 0}, "'n'"),
    ({"messages": MESSAGES, "n": 100000}, "'n'"),
    ({"messages": MESSAGES, "n": "2"}, "'n'"),
    ({"messages": MESSAGES, "n": True}, "'n'"),
    ({"messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "top_p": 1.5}, "top_p"),
    ({"messages": MESSAGES, "seed": "x"}, "seed"),
    ({"messages": MESSAGES, "stop": [1]}, "stop"),
    ({"messages": MESSAGES, "stream": True}, "stream"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_get_a_400_with_a_json_error(scripted, body, fragment):
    server, state = scripted
    r = requests.post(server.url + "/chat/completions", json=body, timeout=10)
    assert r.status_code == 400, body
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert state["calls"] == []


def test_invalid_json_unknown_paths_and_garbage_get_json_errors(scripted):
    server, state = scripted
    r = requests.post(server.url + "/chat/completions", data=b'{"messages": [', timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = requests.post(server.url + "/chat/completions", data=b"\xff\xfe", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = requests.post(server.url + "/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    assert requests.get(server.url.rsplit("/v1", 1)[0] + "/admin", timeout=10).status_code == 404
    assert requests.delete(server.url + "/models", timeout=10).status_code == 501
    listing = requests.get(server.url + "/models", timeout=10).json()
    assert [m["id"] for m in listing["data"]] == ["scripted"] and listing["object"] == "list"
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:  # a broken request line
        s.sendall(b"GET /v1/models HTTP/one\r\n\r\n")
        reply = b"".join(iter(lambda: s.recv(4096), b"")).decode()
    assert '{"error": {"message": "Bad request version' in reply  # stdlib answers a bad request line body-only
    assert state["calls"] == [] and ask(server, "still alive").status_code == 200


def test_template_that_rejects_messages_is_a_400(scripted):
    server, _ = scripted

    class StrictTokenizer:
        chat_template = "strict"

        def apply_chat_template(self, messages, **kw):
            raise ValueError("System role not supported")

    server.tokenizer = StrictTokenizer()
    r = ask(server, "hi")
    assert r.status_code == 400 and "System role not supported" in r.json()["error"]["message"]


def test_shutdown_stops_http_and_the_model_worker():
    server = serve.make_server(object(), PlainTokenizer(), lambda *a, **k: [], port=0)
    http = serve.start_background(server)
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
    server.shutdown()
    http.join(5)
    server.worker.join(5)
    assert not http.is_alive() and not server.worker.is_alive()
    never_served = serve.make_server(object(), PlainTokenizer(), lambda *a, **k: [])
    never_served.shutdown()  # must not hang
    never_served.worker.join(5)
    assert not never_served.worker.is_alive()
