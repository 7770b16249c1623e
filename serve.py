"""An embedded OpenAI-compatible chat server for a local Hugging Face model (stdlib http.server only).

Use it to make any local model the LLM2LLM teacher, or to try the pipeline offline:

    python llm2llm.py serve --model HuggingFaceTB/SmolLM2-1.7B-Instruct --port 8000
    # then point the teacher at http://127.0.0.1:8000/v1

or from Python (this is how tests and the experiment loop embed it):

    server = make_server(model, tokenizer, generate_fn, port=0)     # port 0: any free port
    start_background(server); print(server.url)                      # http://127.0.0.1:PORT/v1
    ...
    server.shutdown()

Endpoints: POST /v1/chat/completions (temperature, top_p, max_tokens / max_completion_tokens, n, seed, stop) and
GET /v1/models. No streaming, tools or logprobs.

Why it batches: on a small model the cost of decoding is dominated by per-step overhead, so eight concurrent
requests decoded together cost little more than one. Handler threads only parse and validate; they put jobs on a
queue, and ONE worker thread owns the model, so the model is never touched by two threads at once.

For Llama-family models served with generate.generate (the CLI and the embedded teacher) the worker batches
continuously: it keeps one generate.DecodeSession running, a request that arrives while others decode is prefilled
into a free slot and joins at the next step, a finished row frees its slot at once, n > 1 is n rows, and rows with
different temperature, top_p, max_tokens, stop and seed share the batch. Any other model or generate_fn is run per
batch: the worker takes everything pending, groups rows that share sampling settings and calls generate_fn once per
group.
"""

import argparse
import json
import queue
import random
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from generate import (DecodeSession, _uses_fast_path, batch_bucket, completion, generate, length_bucket,
                      load_model)

MAX_N = 128  # OpenAI's own limit on n
MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_TOKENS = 512
COLLECT_SECONDS = 0.005  # after the first pending job, wait this long for its concurrent siblings
SYNC_EVERY = 8  # decode steps between the continuous worker's looks at the device (finished rows, stop strings)

# -----------------------------------------------------------------------------
# Request validation. Everything a client sends is checked here, in the handler thread, so the worker only ever
# sees well-formed jobs and a bad request is a 400 with a message saying which field is wrong.


class BadRequest(Exception):
    pass


def _content_text(content, i):
    # OpenAI also allows content as a list of parts; text parts are all a text model can use.
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string (or a list of text parts)")


def _number(body, name, default, lo, hi):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {v!r:.50}")
    return float(v)


def _integer(body, name, default, lo, hi):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be an integer in [{lo}, {hi}], got {v!r:.50}")
    return v


def parse_request(body):
    """Validated chat request -> dict(messages, temperature, top_p, max_tokens, n, seed, stop)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("streaming is not supported by this server; send stream=false")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        clean.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("'stop' must be a string or a list of non-empty strings")
    seed = _integer(body, "seed", None, -2**63, 2**63 - 1)
    return {
        "messages": clean,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default is 1
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "max_tokens": _integer({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20),
        "n": _integer(body, "n", 1, 1, MAX_N),
        "seed": random.randrange(2**31) if seed is None else seed,  # no seed: fresh randomness, like OpenAI
        "stop": tuple(stop or ()),
    }


def render_messages(tokenizer, messages):
    """Chat messages -> one prompt string, with the model's own chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models have no template: a plain transcript with a cue for the reply is the least surprising choice.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

# -----------------------------------------------------------------------------
# The model worker: the only thread that ever calls generate_fn.


def _worker(server):
    while True:
        first = server.jobs.get()
        if first is None:
            return
        batch, rows = [first], first["n"]
        deadline = time.monotonic() + COLLECT_SECONDS
        while rows < server.max_batch:
            try:
                job = server.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # shutting down: finish this batch, then stop
                server.jobs.put(None)
                break
            batch.append(job)
            rows += job["n"]
        try:
            _run_batch(server, batch)
        except Exception as e:  # a bug must cost these requests a 500, never the worker (and so the server)
            for job in batch:
                job["error"] = job["error"] or f"server error: {type(e).__name__}: {e}"
        finally:
            for job in batch:  # whatever happened, no client is left waiting
                if not job["done"].is_set():
                    job["error"] = job["error"] or "generation failed"
                    job["done"].set()


def _run_batch(server, batch):
    groups = {}
    for job in batch:  # rows can share one generate call only if they decode with the same settings
        groups.setdefault((job["temperature"], job["top_p"], job["max_tokens"], job["stop"]), []).append(job)
    for (temperature, top_p, max_tokens, stop), jobs in groups.items():
        prompts = [job["prompt"] for job in jobs for _ in range(job["n"])]
        seeds = [job["seed"] + k for job in jobs for k in range(job["n"])]  # sample k of a request: seed + k
        try:
            outs = server.generate_fn(server.model, server.tokenizer, prompts, max_new_tokens=max_tokens,
                                      batch_size=server.max_batch, temperature=temperature, top_p=top_p,
                                      seed=seeds, stop=list(stop) or None, details=True)
            if len(outs) != len(prompts) or not all(isinstance(o, dict) and isinstance(o.get("text"), str)
                                                    for o in outs):
                raise RuntimeError(f"generate_fn must return {len(prompts)} dicts with a 'text' string")
        except Exception as e:  # a failing group answers 500 to its own clients; the server carries on
            for job in jobs:
                job["error"] = f"generation failed: {type(e).__name__}: {e}"
                job["done"].set()
            continue
        i = 0
        for job in jobs:
            job["outputs"] = outs[i:i + job["n"]]
            i += job["n"]
            job["done"].set()


# -----------------------------------------------------------------------------
# The continuous worker: one DecodeSession that requests join and leave row by row.


def _continuous_worker(server):
    session, waiting = None, deque()  # waiting: rows (job, k) that have no slot yet
    while True:
        busy = session is not None and session.busy()
        if not _take_jobs(server, waiting, block=not waiting and not busy):
            break
        try:
            if waiting:
                session = _fit_session(server, session, waiting)
                _admit(server, session, waiting)
            server.active_rows = 0 if session is None else session.batch - len(session.free_slots())
            if not server.active_rows:
                continue
            sample = session.sampling()
            for _ in range(session.sync_every):
                session.step(sample)
                # a request is waiting and a slot is free: stop early, so it joins at the next step
                if not server.jobs.empty() and session.free_slots():
                    break
            for (job, k), token_ids, reason, n_prompt in session.collect():
                _finish_row(job, k, completion(server.tokenizer, token_ids, reason, job["stop"], n_prompt))
            server.active_rows = session.batch - len(session.free_slots())
        except Exception as e:  # a bug or an out-of-memory costs the requests in flight a 500, never the server
            message = f"generation failed: {type(e).__name__}: {e}"
            for row in session.rows if session is not None else []:
                if row is not None:
                    _fail(row.tag[0], message)
            for job, _ in waiting:  # e.g. no memory for a larger cache: asking again would fail the same way
                _fail(job, message)
            waiting.clear()
            session = None  # its state may be half-written: start afresh
            server.active_rows = 0
    message = "the server is shutting down"
    for job, _ in waiting:
        _fail(job, message)
    for row in session.rows if session is not None else []:
        if row is not None:
            _fail(row.tag[0], message)


def _take_jobs(server, waiting, block):
    """Move every queued job's rows onto `waiting` (waiting for the first one if block); False on shutdown."""
    while True:
        try:
            job = server.jobs.get(block=block)
        except queue.Empty:
            return True
        if job is None:
            return False
        block = False
        try:
            ids = server.tokenizer(job["prompt"], add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError("the rendered prompt has no tokens")
        except Exception as e:
            _fail(job, f"generation failed: {type(e).__name__}: {e}")
            continue
        job.update(ids=ids, outputs=[None] * job["n"], left=job["n"])
        waiting.extend((job, k) for k in range(job["n"]))


def _fit_session(server, session, waiting):
    """A session with room for the waiting rows: more slots (up to max_batch) and a longer cache when needed."""
    active = 0 if session is None else session.batch - len(session.free_slots())
    batch = batch_bucket(min(active + len(waiting), server.max_batch), cap=server.max_batch)
    longest = max(len(job["ids"]) + job["max_tokens"] for job, _ in list(waiting)[:batch])
    limit = getattr(server.model.config, "max_position_embeddings", None)
    length = length_bucket(longest, cap=limit)
    if session is None:
        return DecodeSession(server.model, server.tokenizer, batch, length, sync_every=SYNC_EVERY)
    if batch > session.batch or length > session.length:
        session.resize(max(batch, session.batch), max(length, session.length))
    return session


def _admit(server, session, waiting):
    """Prefill as many waiting rows as there are free slots (oldest first)."""
    take = []
    while waiting and len(take) < len(session.free_slots()):
        job, k = waiting.popleft()
        if session.room(len(job["ids"])) < 1:
            limit = session.length - 1
            _fail(job, f"the prompt has {len(job['ids'])} tokens; this model takes at most {limit} with a reply",
                  status=400)
        elif not job["error"]:
            take.append((job, k))
    if not take:
        return
    items = [(job["ids"], dict(max_new_tokens=job["max_tokens"], temperature=job["temperature"], top_p=job["top_p"],
                               seed=job["seed"] + k, stop=list(job["stop"]) or None), (job, k)) for job, k in take]
    try:
        session.add(items)
    except Exception as e:  # e.g. out of memory in prefill: only these requests fail
        for job in {id(job): job for job, _ in take}.values():
            _fail(job, f"generation failed: {type(e).__name__}: {e}")
        session.release([s for s, row in enumerate(session.rows) if row is not None and row.tag[0]["error"]])
        waiting_left = [(job, k) for job, k in waiting if not job["error"]]
        waiting.clear()
        waiting.extend(waiting_left)


def _finish_row(job, k, output):
    if job["error"]:
        return
    job["outputs"][k] = output
    job["left"] -= 1
    if not job["left"]:
        job["done"].set()


def _fail(job, message, status=500):
    if not job["done"].is_set():
        job["error"] = job["error"] or message
        job["status"] = status
        job["done"].set()

# -----------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients with a connection pool reuse their sockets
    server_version = "llm2llm-serve"

    def log_message(self, fmt, *args):
        if self.server.log:  # one line per request, never a message body
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _json(self, status, obj):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (malformed request line, unsupported method) in the same JSON shape as ours.
        self.close_connection = True
        try:
            self._json(code, {"error": {"message": message or self.responses.get(code, ("error",))[0],
                                        "type": "invalid_request_error" if code < 500 else "server_error"}})
        except OSError:
            pass

    def _path(self):
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self):
        if self._path() == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "llm2llm"}]})
        self.send_error(404, f"unknown path {self._path()!r}; this server has GET /v1/models and "
                             f"POST /v1/chat/completions")

    def do_POST(self):
        if self._path() != "/v1/chat/completions":
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= MAX_BODY_BYTES:
                self.rfile.read(length)  # drain, so a keep-alive client's next request is read correctly
            return self.send_error(404, f"unknown path {self._path()!r}; use POST /v1/chat/completions")
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if length < 0:
            return self.send_error(411, "a Content-Length header is required")
        if length > MAX_BODY_BYTES:
            return self.send_error(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        try:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"the request body is not valid JSON ({e})") from None
            req = parse_request(body)
            try:
                req["prompt"] = render_messages(self.server.tokenizer, req["messages"])
            except Exception as e:  # e.g. a template that rejects a system message
                raise BadRequest(f"the chat template could not render these messages: {e}") from None
        except BadRequest as e:
            return self.send_error(400, str(e))
        job = dict(req, done=threading.Event(), outputs=None, error=None)
        self.server.jobs.put(job)
        while not job["done"].wait(1.0):  # the worker always sets it; this only guards against a dead worker
            if not self.server.worker.is_alive():
                job["error"] = "the model worker has stopped (server shutting down)"
                break
        if job["error"]:
            return self.send_error(job.get("status", 500), job["error"])
        outs = job["outputs"]
        prompt_tokens = int(outs[0].get("prompt_tokens", 0))  # the prompt is read once however many samples
        completion_tokens = sum(int(o.get("completion_tokens", 0)) for o in outs)
        self._json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [{"index": k, "message": {"role": "assistant", "content": o["text"]},
                         "finish_reason": o.get("finish_reason", "stop")} for k, o in enumerate(outs)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client that hangs up mid-request must not keep the process alive
    request_queue_size = 128  # the stdlib's backlog of 5 resets connections when many client workers start at once

    def serve_forever(self, poll_interval=0.5):
        self.serving = True
        super().serve_forever(poll_interval)

    def shutdown(self):
        if getattr(self, "serving", False):  # BaseServer.shutdown waits forever on a server that never served
            super().shutdown()
        self.stop_worker()
        self.server_close()

    def stop_worker(self):
        """Stop the model worker after what it is doing, and wait for it. Waiting matters: a daemon thread still
        inside torch when the interpreter exits is killed mid-C++ and the process aborts ("terminate called
        without an active exception", exit 134) after all of its work was done."""
        self.jobs.put(None)
        if self.worker is not threading.current_thread():
            self.worker.join()

    def handle_error(self, request, client_address):
        # A client that disconnects before its reply is normal (e.g. a timeout on its side): not worth a traceback.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def make_server(model, tokenizer, generate_fn, host="127.0.0.1", port=0, model_name=None, max_batch=16,
                log=False, continuous=None):
    """An OpenAI-compatible server for `model`, not yet serving; its URL is server.url. port=0 picks a free port.

    generate_fn(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p, seed, stop, details=True)
    must return one dict {"text", "prompt_tokens", "completion_tokens", "finish_reason"} per prompt.
    continuous: batch continuously in a DecodeSession (generate_fn is then not called). Default: when generate_fn
    is generate.generate and the model is Llama-family. log=True prints one line per request to stderr (the CLI
    does; the embedded teacher stays quiet).
    """
    server = _Server((host, port), Handler)
    server.model, server.tokenizer, server.generate_fn = model, tokenizer, generate_fn
    server.model_name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "local")
    server.max_batch, server.log = max_batch, log
    server.created = int(time.time())
    server.jobs = queue.Queue()
    server.active_rows = 0  # rows decoding now (continuous worker)
    if continuous is None:
        continuous = generate_fn is generate and _uses_fast_path(model)
    real_host, real_port = server.server_address[:2]
    server.url = f"http://{host or real_host}:{real_port}/v1"
    server.worker = threading.Thread(target=_continuous_worker if continuous else _worker, args=(server,),
                                     name="llm2llm-serve-model", daemon=True)
    server.worker.start()
    return server


def start_background(server):
    """Serve in a daemon thread; server.shutdown() stops both it and the model worker."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                              name="llm2llm-serve-http")
    thread.start()
    return thread

# -----------------------------------------------------------------------------
# CLI (wired as `python llm2llm.py serve ...`)


def main(argv=None):
    p = argparse.ArgumentParser(prog="llm2llm.py serve", description="Serve a local model over an "
                                "OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models).")
    p.add_argument("--model", required=True, help="Hugging Face model id or local folder")
    p.add_argument("--host", default="127.0.0.1", help="use 0.0.0.0 to accept other machines (no auth!)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="name reported to clients (default: --model)")
    p.add_argument("--max-batch", type=int, default=16, help="most rows decoded together")
    args = p.parse_args(argv)

    try:
        model, tokenizer = load_model(args.model)  # fp32 on CPU, bf16 on CUDA
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        server = make_server(model, tokenizer, generate, host=args.host, port=args.port,
                             model_name=args.model_name or args.model, max_batch=args.max_batch, log=True)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}. Pick another --port.", file=sys.stderr)
        return 2
    print(f"serving {args.model} on {model.device} at {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop_worker()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
