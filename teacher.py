"""The teacher client: asks any OpenAI-compatible chat endpoint for completions, many at once, safely.

LLM2LLM's teacher writes new training examples from the seed examples the student got wrong. This module is the
only code that talks to it. It is plain HTTP (requests) plus a thread pool, built to survive a real network:

  * retries with exponential backoff and jitter on connection errors, timeouts, 408, 429 and 5xx, honouring
    Retry-After; a hard cap on attempts, after which the job ends as a reported failure (never an exception);
  * adaptive concurrency: a request that times out halves the number of requests in flight, so a server that
    decodes one request at a time is not buried under queued requests that time out and are sent again while it
    still works on the abandoned ones;
  * a content-addressed on-disk cache, so rerunning or resuming an experiment never repeats a paid call, and a
    run whose replies are all cached never needs the endpoint (the URL may be a function called on first need);
  * token and request accounting, and an optional budget (in tokens, or in any unit computed from the prompt and
    completion tokens, such as FLOPs or dollars) that counts every reply used, cached or new, so a resumed run
    stops where an uninterrupted one does.

Usage:

    from teacher import Teacher, check_reachable
    check_reachable("http://127.0.0.1:8000/v1")                      # fail fast with a clear message
    t = Teacher("https://api.openai.com/v1", "gpt-4o-mini", cache_dir="runs/x/teacher_cache", workers=8)
    results = t.chat_many([{"messages": [{"role": "user", "content": "Write 3 math word problems."}]}])
    results[0]["choices"][0]["text"], results[0]["error"], t.prompt_tokens, t.completion_tokens, t.requests
    t.tokens_used, t.budget_exhausted, t.concurrency

The API key is read from an environment variable (OPENAI_API_KEY unless told otherwise) at the moment of each
request. It is sent only as an Authorization header and is never stored on the object, printed, logged, put in an
error message or written to disk. Teacher replies are untrusted text: this module returns them as strings and
nothing in the project evaluates them.
"""

import email.utils
import hashlib
import json
import os
import random
import tempfile
import threading
import time
import queue
from collections import Counter

import requests
from tqdm import tqdm

BUDGET_SPENT = "teacher token budget spent"

# -----------------------------------------------------------------------------
# The cache key: everything that determines a reply, and nothing else.
# The URL is deliberately NOT part of the key: the embedded server (serve.py) gets a new port on every run, and a
# resumed experiment must hit the cache instead of paying again. Two endpoints serving the same model name are
# therefore treated as interchangeable, which is what a user pointing at a new host for the same model wants.


def cache_key(model, messages, temperature, top_p, max_tokens, n, seed, sample):
    """sha256 of the canonical JSON of a request. `sample` keeps repeated asks with the same seed distinct."""
    fields = {"model": model, "messages": messages, "temperature": temperature, "top_p": top_p,
              "max_tokens": max_tokens, "n": n, "seed": seed, "sample": sample}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def job_seed(seed, messages, sample):
    """The seed sent with one job: a stable hash of the run seed, the job's messages and its sample index. Jobs of
    one ask (different seed examples) get unrelated random streams, and a resumed run sends the same seed for the same
    job. 31 bits, which every server accepts."""
    canonical = json.dumps({"seed": seed, "messages": messages, "sample": sample}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return int(hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8], 16) & 0x7FFFFFFF


def _cache_path(cache_dir, key):
    # Two-character fan-out keeps directories small when a run caches tens of thousands of replies.
    return os.path.join(cache_dir, key[:2], key + ".json")


def _read_cache(cache_dir, key):
    """A cached reply, or None. A cache file is data anyone may have edited: an entry that is not exactly the shape
    this module writes (a non-empty list of {"text": str, "finish_reason": str} choices, token counts that are whole
    numbers of 0 or more) is treated as a miss, with a warning naming the file, and asked again."""
    if not cache_dir:
        return None
    path = _cache_path(cache_dir, key)
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        tqdm.write(f"warning: {path}: unreadable cached teacher reply ({type(e).__name__}); asking again")
        return None
    problem = _entry_problem(entry)
    if problem:
        tqdm.write(f"warning: {path}: {problem}; not a cached teacher reply, asking again")
        return None
    return entry


def _entry_problem(entry):
    if not isinstance(entry, dict):
        return "not a JSON object"
    choices = entry.get("choices")
    if not isinstance(choices, list) or not choices:
        return "'choices' is not a non-empty list"
    if not all(isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("finish_reason"), str)
               for c in choices):
        return "a choice is not {text: string, finish_reason: string}"
    for name in ("prompt_tokens", "completion_tokens", "prompt_tokens_computed"):
        value = entry.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"'{name}' is not a whole number of 0 or more"
    return None


def _write_cache(cache_dir, key, entry):
    # Write to a temporary file in the same directory, then rename: a crash never leaves half a JSON file behind.
    path = _cache_path(cache_dir, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

# -----------------------------------------------------------------------------
# Retry policy. Transient failures (network, overload, rate limits, garbled replies) are retried; a request the
# server says is wrong (400, 401, 404, ...) will not become right by asking again, so it fails at once.

RETRYABLE_STATUS = {408, 429}  # plus every 5xx


def parse_retry_after(value, cap):
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped; None if absent/garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)


def _backoff_delay(attempt, base, cap):
    # Exponential growth with jitter in [d/2, d], so many workers hitting one rate limit do not retry in lockstep.
    d = min(cap, base * 2 ** (attempt - 1))
    return d * (0.5 + 0.5 * random.random())


def _error_snippet(resp):
    """The server's own error message if it sent one (OpenAI shape), else the start of the body."""
    try:
        body = resp.json()
        msg = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        text = str(msg)
    except ValueError:
        text = resp.text
    return " ".join(text.split())[:300]


def _parse_reply(body):
    """OpenAI chat.completion JSON -> (choices, prompt_tokens, completion_tokens); raises ValueError if malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        raise ValueError("reply has no choices")
    choices = []
    for c in sorted(body["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
        message = c.get("message") if isinstance(c, dict) else None
        if not isinstance(message, dict):
            raise ValueError("reply choice has no message")
        text = message.get("content")
        if text is None:
            text = ""  # some servers send null content (e.g. everything went to hidden reasoning)
        if not isinstance(text, str):
            raise ValueError("reply message content is not a string")
        choices.append({"text": text, "finish_reason": c.get("finish_reason") or "stop"})
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    # Servers that report no usage are counted as 0 tokens; the budget then cannot protect you, so say so upstream.
    return choices, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)

# -----------------------------------------------------------------------------
# The client


def _api_key(api_key_env):
    """The key's value, read from the environment at each use and never kept."""
    return os.environ.get(api_key_env) if api_key_env else None


def _auth_headers(api_key_env):
    key = _api_key(api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


class Teacher:
    """An OpenAI-compatible chat client with retries, an on-disk cache, token accounting and a token budget.

    `url` is the base URL, or a function that returns it (e.g. one that starts a local server): it is called once,
    for the first request the cache cannot answer, so a run whose replies are all cached never starts a server.

    The object owns the HTTP sessions (one per worker thread), the cache directory and the counters:
      prompt_tokens, completion_tokens  -- tokens of NEW (non-cached) replies, summed over all calls
      requests                          -- real HTTP requests sent (retries included, cache hits excluded)
      tokens_used                       -- budget_spent plus the tokens of every reply returned, cached or new:
                                           what the budget counts, so a resumed run spends as an uninterrupted one
      prompt_used, completion_used      -- the same, split into prompt and completion tokens (from spent_split)
      prompt_computed_used              -- prompt tokens as computed: a reply of n samples prefills its prompt
                                           once per sample, so this is the prompt times n where an API bills it once
      cached_replies                    -- replies read from the cache
      budget_exhausted                  -- True once tokens_used reached budget_tokens, or once budget_over
                                           (prompt_used, completion_used, prompt_computed_used) is true; new
                                           requests are refused
      concurrency                       -- requests allowed in flight: `workers`, halved after a timeout
    With several workers the budget can be overshot by the replies already in flight when it runs out.
    """

    def __init__(self, url, model, *, api_key_env="OPENAI_API_KEY", cache_dir=None, workers=4, max_attempts=6,
                 timeout=300.0, budget_tokens=None, budget_spent=0, budget_over=None, spent_split=(0, 0, 0),
                 temperature=0.7, top_p=1.0, max_tokens=1024, seed=0, backoff=1.0, max_backoff=30.0):
        if max_attempts < 1 or workers < 1:
            raise ValueError("Teacher needs workers >= 1 and max_attempts >= 1")
        self.url = url.rstrip("/") if isinstance(url, str) else None
        self._start_endpoint = None if isinstance(url, str) else url
        self._endpoint_error = None
        self.model = model
        self.api_key_env = api_key_env  # the variable's NAME; its value is read per request and never kept
        self.cache_dir = cache_dir
        self.workers = workers
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.budget_tokens = budget_tokens
        # a budget in another unit (FLOPs, dollars): a function of the prompt and completion tokens used so far
        self.budget_over = budget_over
        self.temperature, self.top_p, self.max_tokens, self.seed = temperature, top_p, max_tokens, seed
        self.backoff, self.max_backoff = backoff, max_backoff
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0
        self.tokens_used = budget_spent
        self.prompt_used, self.completion_used, self.prompt_computed_used = spent_split
        self.cached_replies = 0
        self.concurrency = workers
        self._in_flight = 0
        self._lock = threading.Lock()
        self._slots = threading.Condition(self._lock)
        self._endpoint_lock = threading.Lock()
        self._local = threading.local()

    def __repr__(self):
        return f"Teacher(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    @property
    def budget_exhausted(self):
        return (self.budget_tokens is not None and self.tokens_used >= self.budget_tokens) or (
            self.budget_over is not None and bool(self.budget_over(self.prompt_used, self.completion_used,
                                                                   self.prompt_computed_used)))

    # -- public -------------------------------------------------------------

    def chat_many(self, jobs, progress=True):
        """Run chat jobs concurrently; returns one result per job, in the order of `jobs`.

        job:    {"messages": [{"role", "content"}, ...], "sample": int = 0, optional "n", "temperature",
                 "top_p", "max_tokens"}
        result: {"choices": [{"text", "finish_reason"}], "prompt_tokens", "completion_tokens", "cache_key",
                 "cached": bool, "error": str | None, "attempts": int}
        A failed job has choices == [] and a message in "error"; it never raises. finish_reason "length" means the
        reply was cut off by max_tokens, so its last item is incomplete.
        """
        requests_ = [self._prepare(i, job) for i, job in enumerate(jobs)]
        # Identical jobs in one batch are asked once: the second copy would be a paid duplicate of the first.
        by_key, copies = {}, {}
        for r in requests_:
            by_key.setdefault(r["key"], r)
            copies[r["key"]] = copies.get(r["key"], 0) + 1
        # The workers are daemon threads, not a thread pool: an interrupt (Ctrl-C) returns at once instead of waiting
        # for the requests in flight, which are abandoned (a reply that still completes is cached; nothing partial
        # is), and no new request starts.
        pending, finished, cancelled = list(by_key.items()), queue.Queue(), threading.Event()

        def worker():
            while not cancelled.is_set():
                with self._lock:
                    if not pending:
                        return
                    key, request = pending.pop(0)
                try:
                    finished.put((key, self._run(request)))
                except BaseException as e:  # _run never raises for request trouble; a bug here should be loud
                    finished.put((key, e))

        for _ in range(min(self.workers, len(by_key))):
            threading.Thread(target=worker, daemon=True, name="teacher-request").start()
        results = {}
        bar = tqdm(total=len(jobs), desc="teacher", unit="req", disable=not progress, dynamic_ncols=True)
        try:
            while len(results) < len(by_key):
                try:
                    key, result = finished.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(result, BaseException):
                    raise result
                results[key] = result
                bar.update(copies[key])
                bar.set_postfix(tokens=self.prompt_tokens + self.completion_tokens, refresh=False)
        except BaseException:
            cancelled.set()
            raise
        finally:
            bar.close()
        return [dict(results[r["key"]], choices=[dict(c) for c in results[r["key"]]["choices"]]) for r in requests_]

    # -- internals ------------------------------------------------------------

    def _prepare(self, index, job):
        if not isinstance(job, dict) or not isinstance(job.get("messages"), list) or not job["messages"]:
            raise ValueError(f"teacher job {index}: expected a dict with a non-empty 'messages' list, got {job!r:.200}")
        for m in job["messages"]:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"teacher job {index}: each message needs string 'role' and 'content', got {m!r:.200}")
        sample = int(job.get("sample", 0))
        params = {
            "temperature": job.get("temperature", self.temperature),
            "top_p": job.get("top_p", self.top_p),
            "max_tokens": job.get("max_tokens", self.max_tokens),
            "n": int(job.get("n", 1)),
        }
        # Each job gets its own seed from the run seed, its messages and its sample index, so samples differ from
        # each other (across seed examples and asks) yet are reproducible. Servers that ignore seeds still get
        # distinct cache keys through `sample`.
        seed = None if self.seed is None else job_seed(self.seed, job["messages"], sample)
        payload = {"model": self.model, "messages": job["messages"], **params}
        if params["n"] == 1:
            del payload["n"]  # some servers reject n; only send it when it matters
        if seed is not None:
            payload["seed"] = seed
        key = cache_key(self.model, job["messages"], params["temperature"], params["top_p"], params["max_tokens"],
                        params["n"], self.seed, sample)
        return {"key": key, "payload": payload}

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:  # requests.Session is not guaranteed thread-safe, so each worker thread keeps its own
            s = self._local.session = requests.Session()
        return s

    def _headers(self):
        return {"Content-Type": "application/json", **_auth_headers(self.api_key_env)}

    def _scrub(self, text):
        # Some servers echo the credential back in error messages; make sure it never reaches our errors or logs.
        key = _api_key(self.api_key_env)
        return text.replace(key, "***") if key else text

    def _endpoint(self):
        """The base URL, starting the endpoint on first need. A start that failed is not tried again by every
        worker: its error is raised to each of them, and from there out of chat_many."""
        with self._endpoint_lock:
            if self._endpoint_error is not None:
                raise self._endpoint_error
            if self.url is None:
                try:
                    self.url = self._start_endpoint().rstrip("/")
                except BaseException as e:
                    self._endpoint_error = e
                    raise
            return self.url

    # Adaptive concurrency. A server that decodes one request at a time (llama.cpp's by default) queues the others,
    # and the queue time counts against the client's timeout. With a fixed number of workers, queued requests time
    # out, are abandoned and sent again while the server still works on them, and the pile only grows. So a
    # timeout halves the requests allowed in flight; the workers above the limit wait their turn. The limit is
    # halved at most once per generation of requests (a timeout of a request sent under a higher limit than the
    # current one is already accounted for), and it is not raised again: a server that is too slow once stays so.

    def _acquire_slot(self):
        with self._slots:
            while self._in_flight >= self.concurrency:
                self._slots.wait()
            self._in_flight += 1
            return self.concurrency

    def _release_slot(self, limit_when_sent, timed_out):
        with self._slots:
            self._in_flight -= 1
            if timed_out and limit_when_sent == self.concurrency > 1:
                self.concurrency //= 2
                tqdm.write(f"teacher: a request timed out after {self.timeout:g}s; allowing {self.concurrency} "
                           f"request(s) in flight from now on (a server that decodes one request at a time queues "
                           f"the others; if it is just slow, raise the timeout)")
            self._slots.notify_all()

    def _run(self, req):
        key, payload = req["key"], req["payload"]
        result = {"choices": [], "prompt_tokens": 0, "completion_tokens": 0, "prompt_tokens_computed": 0, "cache_key": key,
                  "cached": False, "error": None, "attempts": 0}
        entry = _read_cache(self.cache_dir, key)
        if entry is not None:  # paid for earlier (maybe by a run that was killed): counts toward the budget again
            pt, ct = entry.get("prompt_tokens", 0), entry.get("completion_tokens", 0)
            # entries written before the computed count was kept: n samples of one request prefilled n prompts
            n = entry.get("request", {}).get("n", 1) if isinstance(entry.get("request"), dict) else 1
            pc = entry.get("prompt_tokens_computed", pt * n if isinstance(n, int) and n > 0 else pt)
            with self._lock:
                self.tokens_used += pt + ct
                self.prompt_used += pt
                self.completion_used += ct
                self.prompt_computed_used += pc
                self.cached_replies += 1
            return dict(result, choices=entry["choices"], prompt_tokens=pt, completion_tokens=ct,
                        prompt_tokens_computed=pc, cached=True)

        # Servers differ on n: llama.cpp's answers n=2 with one choice and no error. The missing choices are asked
        # for again, each top-up with its own seed (derived from the job's seed and the round), so k means k on
        # every server. A server that sends more than asked is cut to n. At most n requests: each adds a choice.
        want = payload.get("n", 1)
        choices, pt, ct, pc, attempts = [], 0, 0, 0, 0
        for round_ in range(want):
            ask = dict(payload)
            if round_:
                missing = want - len(choices)
                ask.pop("n", None)
                if missing > 1:
                    ask["n"] = missing
                if "seed" in ask:
                    ask["seed"] = job_seed(ask["seed"], payload["messages"], f"top-up {round_}")
            got, p, c, tries, error = self._post(ask)
            attempts += tries
            # a request for n samples prefills its prompt n times (once per row), though an API bills it once
            pt, ct, pc = pt + p, ct + c, pc + p * ask.get("n", 1)
            if error is not None:
                return dict(result, error=error, attempts=attempts, prompt_tokens=pt, completion_tokens=ct,
                            prompt_tokens_computed=pc)
            choices += got
            if len(choices) >= want:
                break
        choices = choices[:want]
        if self.cache_dir:  # the request is stored beside the reply so a cache file is auditable
            try:
                _write_cache(self.cache_dir, key, {"request": payload, "choices": choices, "prompt_tokens": pt,
                                                   "completion_tokens": ct, "prompt_tokens_computed": pc})
            except OSError as e:  # a full disk must not throw away a reply that was paid for
                tqdm.write(f"warning: could not cache a teacher reply in {self.cache_dir}: {e}")
        return dict(result, choices=choices, prompt_tokens=pt, completion_tokens=ct, prompt_tokens_computed=pc,
                    attempts=attempts)

    def _post(self, payload):
        """One request with retries: (choices, prompt_tokens, completion_tokens, attempts, error or None)."""
        last_error = "no attempt made"
        attempts = 0
        for attempt in range(1, self.max_attempts + 1):
            limit_when_sent = self._acquire_slot()
            timed_out = False
            try:
                if self.budget_exhausted:
                    return [], 0, 0, attempts, BUDGET_SPENT
                url = self._endpoint()
                attempts = attempt
                retry_after = None
                with self._lock:
                    self.requests += 1
                resp = self._session().post(f"{url}/chat/completions", json=payload, headers=self._headers(),
                                            timeout=self.timeout)
            except requests.Timeout as e:  # no reply in time: maybe queued behind others on a busy server
                timed_out = True
                last_error = f"{type(e).__name__}: {e}"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as e:  # dropped connections
                last_error = f"{type(e).__name__}: {e}"
            except requests.RequestException as e:  # a bad URL and the like: asking again cannot help
                return [], 0, 0, attempts, self._scrub(f"request failed: {type(e).__name__}: {e}")
            else:
                if resp.status_code == 200:
                    try:
                        choices, pt, ct = _parse_reply(resp.json())
                    except (ValueError, TypeError) as e:  # garbled or truncated body: treat as transient
                        last_error = f"malformed reply: {e}"
                    else:
                        with self._lock:
                            self.prompt_tokens += pt
                            self.completion_tokens += ct
                            self.tokens_used += pt + ct
                            self.prompt_used += pt
                            self.completion_used += ct
                            self.prompt_computed_used += pt * payload.get("n", 1)
                        return choices, pt, ct, attempts, None
                else:
                    last_error = f"HTTP {resp.status_code}: {_error_snippet(resp)}"
                    if resp.status_code not in RETRYABLE_STATUS and resp.status_code < 500:
                        hint = f" (check ${self.api_key_env})" if resp.status_code in (401, 403) else ""
                        return [], 0, 0, attempts, self._scrub(last_error + hint)
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), self.max_backoff)
            finally:  # the slot is free again before any backoff sleep
                self._release_slot(limit_when_sent, timed_out)
            if attempt < self.max_attempts:
                delay = retry_after if retry_after is not None else _backoff_delay(attempt, self.backoff,
                                                                                    self.max_backoff)
                tqdm.write(self._scrub(f"teacher: attempt {attempt}/{self.max_attempts} failed ({last_error[:200]}); "
                                       f"retrying in {delay:.1f}s"))
                time.sleep(delay)
        return [], 0, 0, attempts, self._scrub(f"gave up after {self.max_attempts} attempts; last error: "
                                               f"{last_error}")

# -----------------------------------------------------------------------------
# Asking for a batch of jobs the way the loop needs it: usage counted once per distinct reply, and any failure
# other than a spent budget stops the run (its finished replies stay cached, so a rerun pays nothing twice).


class TeacherError(RuntimeError):
    """The teacher failed on some jobs; the message says how many and the first error."""


def ask_all(client, jobs, what="requests", who="teacher"):
    """(results, usage): every job's reply, and what the replies used, whether paid now or read from the cache, so a
    resumed run reports the same numbers as an uninterrupted one. Identical jobs are asked, and counted, once. usage
    counts prompt and completion tokens as billed, prompt_computed (prompts as prefilled: once per sample), replies,
    cached (replies read from the cache) and http_requests (sent now, retries and re-sent requests included). A spent
    budget leaves a job unanswered; any other failure stops the run (finished replies stay cached)."""
    requests_before = getattr(client, "requests", 0)
    results = client.chat_many(jobs)
    usage = Counter()
    for r in {r["cache_key"]: r for r in results}.values():
        usage.update(prompt=r["prompt_tokens"] or 0, completion=r["completion_tokens"] or 0,
                     prompt_computed=r.get("prompt_tokens_computed", r["prompt_tokens"]) or 0, replies=1,
                     cached=int(bool(r.get("cached"))))
    usage["http_requests"] = getattr(client, "requests", 0) - requests_before
    failed = [r["error"] for r in results if r["error"] and r["error"] != BUDGET_SPENT]
    if failed:
        raise TeacherError(f"the {who} failed on {len(failed)} of {len(jobs)} {what} (first: {failed[0]}). "
                           f"Its finished replies are cached.")
    return results, usage


# -----------------------------------------------------------------------------
# Fail fast at start-up: a typo in the URL should cost one second, not a trained student and then a crash.


def check_reachable(url, api_key_env="OPENAI_API_KEY", timeout=10.0):
    """GET {url}/models; returns the served model ids, or raises RuntimeError with a message saying what to do."""
    url = url.rstrip("/")
    key = _api_key(api_key_env)
    try:
        resp = requests.get(f"{url}/models", headers=_auth_headers(api_key_env), timeout=timeout)
    except requests.RequestException as e:
        raise RuntimeError(
            f"cannot reach the teacher at {url} ({type(e).__name__}). Is the server running and is the URL the "
            f"OpenAI-compatible base, ending in /v1 (e.g. http://127.0.0.1:8000/v1)? To serve a local model: "
            f"python llm2llm.py serve --model PATH_OR_ID") from None
    if resp.status_code in (401, 403):
        env = f"${api_key_env}" if api_key_env else "an API key variable"
        raise RuntimeError(f"the teacher at {url} rejected the request (HTTP {resp.status_code}); "
                           f"set {env} to a valid API key" + ("" if key else f" ({env} is not set)"))
    if resp.status_code != 200:
        text = _error_snippet(resp).replace(key, "***") if key else _error_snippet(resp)
        raise RuntimeError(f"the teacher at {url} answered GET /models with HTTP {resp.status_code}: {text}. "
                           f"Check that the URL is the OpenAI-compatible base ending in /v1.")
    try:
        data = resp.json().get("data", [])
        return [m["id"] for m in data if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError):
        return []  # reachable but odd listing (some servers): chat requests will tell us more
