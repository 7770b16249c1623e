"""Tests for teacher.py against a real HTTP server that misbehaves on purpose.

The server is a stdlib ThreadingHTTPServer on 127.0.0.1 (port 0) started inside the test. Each job's last user
message names a script, e.g. "429,ok": the first request for it gets a 429, the second a proper reply. The server
counts every request it sees, so "served from cache" means zero requests, checked on the wire.

Run: python -m pytest -q tests/test_teacher.py
"""

import email.utils
import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import teacher as T  # noqa: E402

FAKE_KEY = "sk-test-DO-NOT-LEAK-7f3a9c1e"
SLOW_SECONDS = 1.0  # the client timeout in tests is 0.25 s
USAGE = {"prompt_tokens": 11, "completion_tokens": 4}

# -----------------------------------------------------------------------------
# A scripted OpenAI-compatible server


class Scripted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers, so dropped connections hit a pooled socket

    def log_message(self, *args):
        pass

    def _send(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        st = self.server.state
        with st["lock"]:
            st["auth"].append(self.headers.get("Authorization"))
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "no such path", "type": "not_found"}})

    def do_POST(self):
        st = self.server.state
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no such path {self.path}", "type": "not_found"}})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        script = body["messages"][-1]["content"]
        with st["lock"]:
            st["total"] += 1
            st["auth"].append(self.headers.get("Authorization"))
            st["bodies"].append(body)
            i = st["count"].get(script, 0)
            st["count"][script] = i + 1
        steps = script.split(",")
        step = steps[min(i, len(steps) - 1)]
        ok = {"id": "x", "object": "chat.completion", "model": body["model"], "usage": USAGE,
              "choices": [{"index": k, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": f"{script}|seed={body.get('seed')}|k={k}"}}
                          for k in range(body.get("n", 1))]}
        if step == "ok":
            self._send(200, ok)
        elif step == "429":  # a huge Retry-After that the client must cap
            self._send(429, {"error": {"message": "rate limited"}}, [("Retry-After", "3600")])
        elif step == "429date":
            when = email.utils.formatdate(time.time() + 3600, usegmt=True)
            self._send(429, {"error": {"message": "rate limited"}}, [("Retry-After", when)])
        elif step in ("500", "503", "408", "400", "404"):
            self._send(int(step), {"error": {"message": f"scripted {step}", "type": "x"}})
        elif step == "401echo":  # a careless server that echoes the credential it got
            self._send(401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
        elif step == "slow":
            time.sleep(SLOW_SECONDS)
            try:
                self._send(200, ok)
            except OSError:
                pass
        elif step == "badjson":
            self._send(200, b'{"choices": [{"message": {"content": "unterminated')
        elif step == "nochoices":
            self._send(200, {"id": "x", "object": "chat.completion", "usage": USAGE})
        elif step == "length":
            ok["choices"][0]["finish_reason"] = "length"
            ok["choices"][0]["message"]["content"] = "1. a full item\n2. a half ite"
            self._send(200, ok)
        elif step == "drop":  # read the request, then hang up without a word
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            raise AssertionError(f"unknown scripted step {step!r}")


def start_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # the client hanging up on "slow" is expected
    server.state = {"lock": threading.Lock(), "total": 0, "count": {}, "auth": [], "bodies": []}
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host, port = server.server_address
    return server, f"http://{host}:{port}/v1/"  # trailing slash on purpose: the client must strip it


@pytest.fixture
def server():
    srv, url = start_server()
    yield srv, url
    srv.shutdown()
    srv.server_close()


def make_teacher(url, **kw):
    opts = dict(workers=4, max_attempts=4, timeout=0.25, backoff=0.001, max_backoff=0.01, model="scripted-model")
    opts.update(kw)
    return T.Teacher(url, opts.pop("model"), **opts)


def job(script, **kw):
    return {"messages": [{"role": "system", "content": "You write data."}, {"role": "user", "content": script}],
            **kw}

# -----------------------------------------------------------------------------
# Retries, failures, truncation


def test_messy_server_every_job_ends_in_a_result_or_reported_failure(server, tmp_path):
    srv, url = server
    scripts = ["ok", "429,ok", "429date,ok", "500,503,ok", "408,ok", "slow,ok", "badjson,ok", "nochoices,ok",
               "drop,ok", "length", "500", "badjson", "400", "404,ok"]
    t = make_teacher(url, cache_dir=str(tmp_path / "cache"))
    results = t.chat_many([job(s) for s in scripts], progress=False)
    by = dict(zip(scripts, results))

    # Transient trouble is retried until the scripted "ok"; each ends after exactly that many attempts.
    for s in ["ok", "429,ok", "429date,ok", "500,503,ok", "408,ok", "slow,ok", "badjson,ok", "nochoices,ok",
              "drop,ok"]:
        r = by[s]
        assert r["error"] is None, (s, r["error"])
        assert r["choices"][0]["text"].startswith(s + "|"), s
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["attempts"] == len(s.split(",")) == srv.state["count"][s], s
        assert (r["prompt_tokens"], r["completion_tokens"]) == (11, 4)

    # Cut off by max_tokens: returned as such, so the parser can drop only the incomplete last item.
    assert by["length"]["error"] is None and by["length"]["choices"][0]["finish_reason"] == "length"

    # Persistent transient failures end at the attempt cap as a reported failure.
    for s in ["500", "badjson"]:
        assert by[s]["choices"] == [] and by[s]["attempts"] == 4 == srv.state["count"][s]
        assert "gave up after 4 attempts" in by[s]["error"]
    assert "HTTP 500" in by["500"]["error"] and "malformed" in by["badjson"]["error"]

    # A request the server calls wrong is not asked again.
    for s in ["400", "404,ok"]:
        assert by[s]["attempts"] == 1 == srv.state["count"][s] and by[s]["error"].startswith("HTTP 4")
    assert "scripted 400" in by["400"]["error"]

    # Accounting: every HTTP request is counted, tokens only from successful replies.
    assert t.requests == srv.state["total"]
    n_ok = sum(r["error"] is None for r in results)
    assert (t.prompt_tokens, t.completion_tokens) == (11 * n_ok, 4 * n_ok)


def test_request_body_and_trailing_slash(server):
    srv, url = server
    t = make_teacher(url, temperature=0.3, top_p=0.9, max_tokens=77, seed=100)
    r = t.chat_many([job("ok", sample=5, n=3, max_tokens=12)], progress=False)[0]
    body = srv.state["bodies"][0]
    assert body["model"] == "scripted-model" and body["messages"][1]["content"] == "ok"
    seed = T.job_seed(100, body["messages"], 5)
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["n"], body["seed"]) == (0.3, 0.9, 12, 3, seed)
    assert [c["text"] for c in r["choices"]] == [f"ok|seed={seed}|k={k}" for k in range(3)]
    t.chat_many([job("ok")], progress=False)
    assert "n" not in srv.state["bodies"][1] and srv.state["bodies"][1]["max_tokens"] == 77


def test_each_job_of_an_ask_gets_its_own_seed_and_keeps_it_on_resume(server):
    srv, url = server
    jobs = [job("ok"), job("ok,ok"), job("ok", sample=1)]
    make_teacher(url, seed=7).chat_many(jobs, progress=False)
    first = {(b["messages"][-1]["content"], b["seed"]) for b in srv.state["bodies"]}
    seeds = [s for _, s in sorted(first)]
    assert len(set(seeds)) == 3  # other messages or another sample: another seed, though the run seed is shared
    assert all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds)
    srv.state["bodies"].clear()
    make_teacher(url, seed=7).chat_many(jobs, progress=False)  # a resumed run (no cache): the very same seeds
    assert {(b["messages"][-1]["content"], b["seed"]) for b in srv.state["bodies"]} == first
    srv.state["bodies"].clear()
    make_teacher(url, seed=8).chat_many(jobs[:1], progress=False)  # another run seed: another stream
    assert srv.state["bodies"][0]["seed"] not in seeds
    # stable across processes: a fixed digest, not Python's salted hash()
    assert T.job_seed(7, [{"role": "user", "content": "x"}], 0) == \
        int(hashlib.sha256(b'{"messages":[{"content":"x","role":"user"}],"sample":0,"seed":7}').hexdigest()[:8], 16) \
        & 0x7FFFFFFF


def test_retry_after_parsing():
    assert T.parse_retry_after("2", cap=30) == 2.0
    assert T.parse_retry_after("3600", cap=30) == 30
    assert T.parse_retry_after("-5", cap=30) == 0.0
    assert T.parse_retry_after(None, cap=30) is None
    assert T.parse_retry_after("soon", cap=30) is None
    assert T.parse_retry_after("nan", cap=30) is None
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 15 <= T.parse_retry_after(date, cap=30) <= 21
    assert T.parse_retry_after(email.utils.formatdate(time.time() - 100, usegmt=True), cap=30) == 0.0


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    for attempt, full in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (9, 5.0)]:
        delays = [T._backoff_delay(attempt, base=0.5, cap=5.0) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), attempt
        assert max(delays) - min(delays) > full / 10  # jittered, not lockstep


def test_unreachable_server_is_a_reported_failure_not_an_exception():
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = make_teacher(f"http://127.0.0.1:{port}/v1", max_attempts=3)
    r = t.chat_many([job("ok")], progress=False)[0]
    assert r["choices"] == [] and r["attempts"] == 3 and "ConnectionError" in r["error"]
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}/v1.*llm2llm.py serve"):
        T.check_reachable(f"http://127.0.0.1:{port}/v1")


def test_check_reachable_lists_models(server):
    _, url = server
    assert T.check_reachable(url) == ["scripted-model"]
    with pytest.raises(RuntimeError, match="HTTP 404"):
        T.check_reachable(url + "nope")

# -----------------------------------------------------------------------------
# Cache


def test_second_run_is_served_from_cache_with_zero_requests(server, tmp_path):
    srv, url = server
    cache = str(tmp_path / "cache")
    jobs = [job("ok"), job("ok", sample=1), job("429,ok"), job("length"), job("500"), job("ok", n=2)]
    first = make_teacher(url, cache_dir=cache).chat_many(jobs, progress=False)
    assert first[0]["cache_key"] != first[1]["cache_key"]  # same seed, new sample: a distinct key and seed
    seeds = [T.job_seed(0, jobs[0]["messages"], sample) for sample in (0, 1)]
    assert first[0]["choices"][0]["text"] == f"ok|seed={seeds[0]}|k=0" != first[1]["choices"][0]["text"] == \
        f"ok|seed={seeds[1]}|k=0"
    assert first[4]["error"] is not None
    files = sorted(p for p in (tmp_path / "cache").rglob("*.json"))
    assert len(files) == 5  # failures are not cached
    for p in files:
        assert p.parent.name == p.stem[:2] and len(p.stem) == 64
        assert json.loads(p.read_text())["choices"]

    # A new server on a new port (the embedded server's situation on resume): the cache must still hit.
    srv2, url2 = start_server()
    try:
        t2 = make_teacher(url2, cache_dir=cache, max_attempts=1)
        second = t2.chat_many(jobs, progress=False)
        assert srv2.state["total"] == 1 and srv2.state["count"] == {"500": 1}  # only the failure is asked again
    finally:
        srv2.shutdown()
        srv2.server_close()
    for a, b in zip(first[:4] + first[5:], second[:4] + second[5:]):
        assert b["cached"] and b["choices"] == a["choices"] and b["cache_key"] == a["cache_key"]
        assert (b["prompt_tokens"], b["completion_tokens"]) == (a["prompt_tokens"], a["completion_tokens"])
    assert (t2.prompt_tokens, t2.completion_tokens, t2.requests) == (0, 0, 1)
    assert second[3]["choices"][0]["finish_reason"] == "length"

    # Anything that changes the reply changes the key: model, temperature, max_tokens, seed.
    keys = {T.cache_key("m", jobs[0]["messages"], 0.7, 1.0, 1024, 1, 0, 0)}
    for args in [("m2", 0.7, 1024, 0), ("m", 0.8, 1024, 0), ("m", 0.7, 1000, 0), ("m", 0.7, 1024, 1)]:
        keys.add(T.cache_key(args[0], jobs[0]["messages"], args[1], 1.0, args[2], 1, args[3], 0))
    assert len(keys) == 5


def test_damaged_cache_file_is_asked_again(server, tmp_path):
    srv, url = server
    cache = tmp_path / "cache"
    r = make_teacher(url, cache_dir=str(cache)).chat_many([job("ok")], progress=False)[0]
    path = cache / r["cache_key"][:2] / (r["cache_key"] + ".json")
    path.write_text('{"choices": [{"te')  # e.g. a copy interrupted half-way
    r2 = make_teacher(url, cache_dir=str(cache)).chat_many([job("ok")], progress=False)[0]
    assert not r2["cached"] and r2["error"] is None and srv.state["total"] == 2
    assert json.loads(path.read_text())["choices"] == r["choices"]
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")]


def test_duplicate_jobs_in_one_batch_are_asked_once(server):
    srv, url = server
    res = make_teacher(url).chat_many([job("ok"), job("ok"), job("ok", sample=1)], progress=False)
    assert srv.state["total"] == 2 and res[0]["choices"] == res[1]["choices"] != res[2]["choices"]
    res[0]["choices"][0]["text"] = "mutated"
    assert res[1]["choices"][0]["text"] != "mutated"  # copies, not shared objects

# -----------------------------------------------------------------------------
# Budget


def test_budget_stops_new_requests(server):
    srv, url = server
    t = make_teacher(url, workers=1, budget_tokens=30)  # 15 tokens per reply: the third request is refused
    res = t.chat_many([job("ok", sample=i) for i in range(6)], progress=False)
    assert [r["error"] for r in res] == [None, None] + [T.BUDGET_SPENT] * 4
    assert t.budget_exhausted and srv.state["total"] == t.requests == 2
    assert t.prompt_tokens + t.completion_tokens == 30


def test_zero_budget_sends_nothing(server):
    srv, url = server
    t = make_teacher(url, budget_tokens=0)
    assert all(r["error"] == T.BUDGET_SPENT for r in t.chat_many([job("ok")], progress=False))
    assert srv.state["total"] == 0 and t.budget_exhausted


def test_budget_counts_cached_replies_so_a_resumed_run_stops_where_an_uninterrupted_one_does(server, tmp_path):
    srv, url = server
    jobs = [job("ok", sample=i) for i in range(5)]
    whole = make_teacher(url, workers=1, budget_tokens=45).chat_many(jobs, progress=False)  # 3 replies of 15
    assert [r["error"] for r in whole] == [None] * 3 + [T.BUDGET_SPENT] * 2

    cache = str(tmp_path / "cache")
    make_teacher(url, workers=1, cache_dir=cache).chat_many(jobs[:2], progress=False)  # a run killed after 2
    srv.state["total"] = 0
    t = make_teacher(url, workers=1, budget_tokens=45, cache_dir=cache)
    resumed = t.chat_many(jobs, progress=False)
    assert [r["error"] for r in resumed] == [r["error"] for r in whole]
    assert [r["cached"] for r in resumed[:3]] == [True, True, False] and srv.state["total"] == 1
    assert t.tokens_used == 45 and (t.prompt_tokens, t.completion_tokens) == (11, 4) and t.budget_exhausted

    # what earlier, finished parts of the run used is passed in and counts too
    t = make_teacher(url, workers=1, budget_tokens=45, budget_spent=30)
    assert [r["error"] for r in t.chat_many(jobs[3:], progress=False)] == [None, T.BUDGET_SPENT]
    assert T.Teacher(url, "m", budget_tokens=45, budget_spent=45).budget_exhausted


def test_the_endpoint_is_started_only_for_a_reply_the_cache_lacks(server, tmp_path):
    _, url = server
    cache = str(tmp_path / "cache")
    make_teacher(url, cache_dir=cache).chat_many([job("ok"), job("ok", sample=1)], progress=False)
    started = []

    def start():
        started.append(1)
        return url

    t = make_teacher(start, cache_dir=cache)
    assert all(r["cached"] for r in t.chat_many([job("ok"), job("ok", sample=1)], progress=False))
    assert started == [] and t.url is None
    results = t.chat_many([job("ok", sample=i) for i in range(2, 8)], progress=False)  # six workers need it at once
    assert started == [1] and all(r["error"] is None for r in results)

    def broken():
        started.append(2)
        raise RuntimeError("could not start the teacher")

    with pytest.raises(RuntimeError, match="could not start"):
        make_teacher(broken, cache_dir=cache).chat_many([job("ok", sample=i) for i in range(10, 16)], progress=False)
    assert started == [1, 2]  # tried once, not by every worker

# -----------------------------------------------------------------------------
# A server that decodes one request at a time (llama.cpp's default): queued requests wait, and the wait counts
# against the client's timeout. A request the client gave up on is still decoded, taking the server's time.

SERVE_SECONDS = 0.1  # per request; the client timeout in this test is 5 times that


class OneAtATime(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        st = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(SERVE_SECONDS)
        st["served"] += 1
        reply = {"id": "x", "object": "chat.completion", "model": body["model"], "usage": USAGE,
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": body["messages"][-1]["content"]}}]}
        data = json.dumps(reply).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            st["abandoned"] += 1


class SingleThreadedServer(HTTPServer):
    request_queue_size = 64  # connections queue up as on a real server instead of being refused


def test_a_one_at_a_time_server_is_not_buried_under_retries(tmp_path):
    srv = SingleThreadedServer(("127.0.0.1", 0), OneAtATime)
    srv.handle_error = lambda request, address: None
    srv.state = {"served": 0, "abandoned": 0}
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        t = make_teacher(f"http://127.0.0.1:{srv.server_address[1]}/v1", workers=16, max_attempts=6,
                         timeout=5 * SERVE_SECONDS, backoff=0.25, max_backoff=1.0)
        results = t.chat_many([job(f"ok {i}") for i in range(32)], progress=False)
    finally:
        srv.shutdown()
        srv.server_close()
    assert [r["error"] for r in results] == [None] * 32
    assert [r["choices"][0]["text"] for r in results] == [f"ok {i}" for i in range(32)]
    assert t.concurrency < 16  # it did time out, and lowered how many requests it keeps in flight

# -----------------------------------------------------------------------------
# Secrets


def test_api_key_is_sent_but_never_leaks(server, tmp_path, monkeypatch, capfd):
    srv, url = server
    monkeypatch.setenv("MY_TEACHER_KEY", FAKE_KEY)
    cache = tmp_path / "cache"
    t = make_teacher(url, api_key_env="MY_TEACHER_KEY", cache_dir=str(cache))
    res = t.chat_many([job("ok"), job("401echo"), job("500"), job("length")], progress=True)
    T.check_reachable(url, api_key_env="MY_TEACHER_KEY")
    assert set(srv.state["auth"]) == {f"Bearer {FAKE_KEY}"}
    assert "bad key Bearer ***" in res[1]["error"] and "MY_TEACHER_KEY" in res[1]["error"]
    out, err = capfd.readouterr()
    assert "teacher" in err  # the progress bar was drawn, so this really checks captured output
    for text in [out, err, repr(t), str(vars(t)), json.dumps(res)]:
        assert FAKE_KEY not in text
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert FAKE_KEY.encode() not in p.read_bytes()


def test_no_authorization_header_without_a_key(server, monkeypatch):
    srv, url = server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    make_teacher(url).chat_many([job("ok")], progress=False)
    assert srv.state["auth"] == [None]


def test_bad_job_is_a_clear_error(server):
    _, url = server
    with pytest.raises(ValueError, match="job 1.*messages"):
        make_teacher(url).chat_many([job("ok"), {"prompt": "hi"}], progress=False)
