"""The LLM2LLM loop end to end: a tiny random student, a scripted teacher behind real HTTP, a small SST-2 fixture.

    python -m pytest -q tests/test_llm2llm.py

Checks what the method promises (only wrong seed examples are sent to the teacher; augmented examples never become
parents), what the run directory promises (metrics keys, resume with zero teacher requests, a kill in the middle of
an iteration ends with the same metrics as an uninterrupted run), and that bad input ends with a clear message and
exit code 2, never a traceback.
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import HTTPServer, ThreadingHTTPServer
from pathlib import Path

import pytest

import dist
import llm2llm
import rundir
from config import Config, parse_args
from conftest import ROOT, ScriptedHandler

POSITIVE = ["a gorgeous , witty , seductive movie", "the film is a delight from start to finish",
            "one of the most moving films of the year", "a smart and funny comedy", "beautifully shot and acted",
            "an uplifting , heartfelt story", "clever writing and a great cast", "it is a triumph"]
NEGATIVE = ["a tedious , overlong mess", "the plot makes no sense at all", "dull characters and flat jokes",
            "a waste of a talented cast", "painfully slow and boring", "the worst film of the summer",
            "a cynical , lazy sequel", "it never comes together"]
METRIC_KEYS = {"iteration", "train_size", "n_seed", "n_wrong", "n_augmented", "n_rejected", "seed_acc", "test_acc",
               "teacher_prompt_tokens", "teacher_completion_tokens", "train_tokens", "train_seconds", "eval_seconds"}
# what describes how a run went rather than what it computed: its timings, and how many teacher replies came from the
# cache and how many HTTP requests were sent (a resumed run sends again the requests a kill cut off)
TIMING_KEYS = {"train_seconds", "eval_seconds", "teacher_seconds", "mistakes_seconds", "teacher_cached_replies",
               "teacher_http_requests"}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data" / "sst2"
    folder.mkdir(parents=True)
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [{"text": t, "label": "negative"} for t in NEGATIVE]
    with open(folder / "train.jsonl", "w") as f:
        for row in rows[::2] + rows[1::2]:
            f.write(json.dumps(row) + "\n")
    with open(folder / "test.jsonl", "w") as f:
        for text, label in [("a warm and wise film", "positive"), ("a chore to sit through", "negative"),
                            ("sharp , funny and true", "positive"), ("lifeless and forgettable", "negative")]:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return tmp_path / "data"


# -----------------------------------------------------------------------------
# A scripted teacher: answers every chat completion with one new, unique SST-2 example derived from a hash of the
# request, records the requests, and can hold a chosen request open so the test can kill the client mid-call. Every
# reply costs REPLY_TOKENS. `status` makes it fail every chat request; `one_at_a_time` with `delay` makes it a
# server that decodes one request at a time, each taking `delay` seconds (llama.cpp's server by default).

REPLY_TOKENS = 112


class OneAtATimeServer(HTTPServer):
    request_queue_size = 64  # waiting connections queue up as on a real server


class ScriptedTeacher:
    def __init__(self, one_at_a_time=False, delay=0.0):
        self.requests, self.hold_request, self.authorization = [], None, []
        self.holding, self.release = threading.Event(), threading.Event()
        self.status, self.delay = 200, delay
        teacher = self

        class Handler(ScriptedHandler):

            def do_GET(self):
                if self.path != "/v1/models":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super().do_GET()

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                teacher.requests.append(request)
                teacher.authorization.append(self.headers.get("Authorization"))
                if teacher.hold_request == len(teacher.requests):
                    teacher.holding.set()
                    teacher.release.wait(60)  # the client is killed while it waits
                time.sleep(teacher.delay)
                if teacher.status != 200:
                    body = json.dumps({"error": {"message": "scripted failure"}}).encode()
                    self.send_response(teacher.status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                user = request["messages"][-1]["content"]
                digest = hashlib.sha256((user + str(request.get("seed"))).encode()).hexdigest()
                words = " ".join("w" + digest[i:i + 5] for i in range(0, 30, 5))
                label = "positive" if int(digest[0], 16) % 2 else "negative"
                text = f"Here is one new snippet.\n1. Text: {words}\nLabel: {label}\n"
                self._send({"id": "x", "object": "chat.completion", "model": request["model"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": REPLY_TOKENS - 12, "completion_tokens": 12,
                                      "total_tokens": REPLY_TOKENS}})

        self.server = (OneAtATimeServer if one_at_a_time else ThreadingHTTPServer)(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None  # a killed client's dropped socket is expected
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seed_texts_sent(self):
        """The seed example each request asked about: the last 'Text:' line of the user message."""
        return [re.findall(r"Text: (.*)", r["messages"][-1]["content"])[-1].strip() for r in self.requests]


@pytest.fixture
def teacher():
    t = ScriptedTeacher()
    yield t
    t.release.set()
    t.server.shutdown()


def flags(student, data_dir, out, teacher_url, *extra):
    return ["--task", "sst2", "--data-dir", str(data_dir), "--student", str(student), "--teacher-url", teacher_url,
            "--teacher-model", "scripted", "--seed-size", "6", "--iterations", "2", "--epochs", "2", "--min-steps", "0",
            "--batch-size", "4", "--max-new-tokens", "4", "--test-limit", "4", "--teacher-workers", "1",
            "--out", str(out), *extra]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


def without_timings(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


# -----------------------------------------------------------------------------
# The loop

def test_two_iterations_follow_the_method_and_resume_for_free(tiny_llama_dir, data_dir, teacher, tmp_path):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url)) == 0

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert METRIC_KEYS <= set(m)
        assert 0 <= m["seed_acc"] <= 1 and 0 <= m["test_acc"] <= 1
        assert m["n_seed"] == 6
    assert metrics[0]["train_size"] == 6
    assert metrics[1]["train_size"] == 6 + metrics[0]["n_augmented"]
    assert metrics[2]["train_size"] == metrics[1]["train_size"] + metrics[1]["n_augmented"]
    assert metrics[2]["n_augmented"] == 0 and metrics[2]["teacher_prompt_tokens"] == 0  # no teacher after the last

    seed = {row["id"]: row for row in read_jsonl(out / "seed.jsonl")}
    assert sorted(row["label"] for row in seed.values()) == ["negative"] * 3 + ["positive"] * 3  # stratified
    # only wrong seed examples went to the teacher, each once per iteration in which it was wrong
    sent = teacher.seed_texts_sent()
    expected = []
    for i in (0, 1):
        wrong = [p["id"] for p in read_jsonl(out / f"iter_{i:02d}" / "seed_predictions.jsonl") if not p["correct"]]
        assert len(wrong) == metrics[i]["n_wrong"]
        expected += [seed[w]["text"] for w in wrong]
    assert sorted(sent) == sorted(expected)
    assert len(sent) == sum(m["teacher_requests"] for m in metrics)
    # augmented examples never became parents: their texts were never sent, and their provenance names seeds
    augmented = read_jsonl(out / "iter_00" / "augmented.jsonl") + read_jsonl(out / "iter_01" / "augmented.jsonl")
    assert augmented and not {a["text"] for a in augmented} & set(sent)
    for a in augmented:
        assert a["provenance"]["parent_id"] in seed
        assert a["provenance"]["teacher_model"] == "scripted" and len(a["provenance"]["cache_key"]) == 64
    # each iteration trained on the previous data plus the new examples, and left a peft-layout adapter
    assert read_jsonl(out / "iter_01" / "train.jsonl") == list(seed.values()) + read_jsonl(
        out / "iter_00" / "augmented.jsonl")
    for i in range(3):
        assert (out / f"iter_{i:02d}" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "report.md").exists() and (out / "report.svg").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["seed_size"] == 6 and "force" not in config

    # the same command again: nothing to do, no teacher request, no file changed
    before, n_requests = snapshot(out), len(teacher.requests)
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url)) == 0
    assert len(teacher.requests) == n_requests
    assert snapshot(out) == before


def kill_during_request(argv, teacher, n):
    """Run llm2llm.py as a real process and SIGKILL it while the teacher holds its n-th request open."""
    teacher.requests.clear()
    teacher.holding.clear()
    teacher.hold_request = n
    proc = subprocess.Popen([sys.executable, str(ROOT / "llm2llm.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert teacher.holding.wait(timeout=240), f"the run never reached teacher request {n}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    teacher.hold_request = None
    teacher.requests.clear()


def test_a_kill_during_teacher_calls_resumes_to_the_same_metrics(tiny_llama_dir, data_dir, teacher, tmp_path):
    reference = tmp_path / "reference"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, reference, teacher.url)) == 0
    n_reference = len(teacher.requests)

    # a real process, killed with SIGKILL while the second teacher request of iteration 0 is in flight
    killed = tmp_path / "killed"
    kill_during_request(flags(tiny_llama_dir, data_dir, killed, teacher.url), teacher, 2)
    assert not (killed / "metrics.jsonl").exists()  # it really died mid-iteration

    assert llm2llm.main(flags(tiny_llama_dir, data_dir, killed, teacher.url)) == 0
    # the finished first reply came from the cache: one request fewer than a run from scratch
    assert len(teacher.requests) == n_reference - 1
    assert without_timings(read_jsonl(killed / "metrics.jsonl")) == \
        without_timings(read_jsonl(reference / "metrics.jsonl"))
    for i in range(3):
        for name in ("augmented.jsonl", "seed_predictions.jsonl", "test_predictions.jsonl"):
            assert read_jsonl(killed / f"iter_{i:02d}" / name) == read_jsonl(reference / f"iter_{i:02d}" / name)


def test_an_unusable_teacher_url_fails_before_any_training(tiny_llama_dir, data_dir, teacher, tmp_path, capsys,
                                                             monkeypatch):
    trained = []
    monkeypatch.setattr(llm2llm, "train", lambda *a, **k: trained.append(1))
    out = tmp_path / "run"
    for url, says in [("http://127.0.0.1:9/v1", "cannot reach the teacher"),
                      (teacher.url[:-len("/v1")], "ending in /v1")]:  # a URL without /v1: its GET /models is a 404
        assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, url)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err, err[-3000:]
    assert trained == [] and not out.exists()


def test_a_teacher_model_the_endpoint_does_not_list_is_warned_about(teacher, capsys):
    cfg = Config(teacher_url=teacher.url, teacher_model="gpt-4o-mini")
    rundir.check_teacher(cfg)
    out = capsys.readouterr().out
    assert "warning" in out and "lists scripted, not --teacher-model gpt-4o-mini" in out
    rundir.check_teacher(Config(teacher_url=teacher.url, teacher_model="scripted"))
    assert capsys.readouterr().out == ""


def test_a_failed_run_without_out_says_which_out_resumes_it(tiny_llama_dir, data_dir, teacher, tmp_path,
                                                             monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    teacher.status = 400  # every chat request is refused: the run stops at the first augmentation
    argv = flags(tiny_llama_dir, data_dir, "unused", teacher.url)
    argv = argv[:argv.index("--out")] + ["--iterations", "1"]
    assert llm2llm.main(argv) == 2
    err = capsys.readouterr().err
    assert "the teacher failed" in err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and f"rerun the same command with --out {Path('runs') / runs[0].name}" in err
    # the rerun with a working teacher picks the run up: iteration 0 is not trained again
    adapter = runs[0] / "iter_00" / "adapter" / "adapter_model.safetensors"
    trained = adapter.read_bytes()
    teacher.status = 200
    assert llm2llm.main(argv[:-2] + ["--iterations", "1", "--out", str(runs[0])]) == 0
    assert adapter.read_bytes() == trained and len(read_jsonl(runs[0] / "metrics.jsonl")) == 2


def test_the_budget_counts_cached_replies_and_what_it_paid_for_is_trained_on(tiny_llama_dir, data_dir, teacher,
                                                                             tmp_path):
    # a budget of two replies, spent during iteration 0 of 3
    argv = lambda out: flags(tiny_llama_dir, data_dir, out, teacher.url, "--iterations", "3",  # noqa: E731
                             "--teacher-budget-tokens", str(2 * REPLY_TOKENS))
    reference = tmp_path / "reference"
    assert llm2llm.main(argv(reference)) == 0
    metrics = read_jsonl(reference / "metrics.jsonl")
    assert metrics[0]["n_wrong"] > 2 and len(teacher.requests) == 2  # the budget, not the wrong seeds, stopped it
    assert metrics[0]["stopped"] and metrics[0]["n_augmented"] > 0
    # the examples paid for were trained on: one more fine-tune and evaluation, without the teacher, then the stop
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert metrics[1]["train_size"] == 6 + metrics[0]["n_augmented"] and metrics[1]["stopped"]
    assert metrics[1]["teacher_requests"] == 0 and metrics[1]["n_augmented"] == 0
    assert read_jsonl(reference / "iter_01" / "train.jsonl")[6:] == read_jsonl(reference / "iter_00" / "augmented.jsonl")
    assert_budget_stop_survives_kills(argv, teacher, metrics, tmp_path)


def assert_budget_stop_survives_kills(argv, teacher, metrics, tmp_path):
    """A budget of two replies, spent in iteration 0 (metrics: the uninterrupted run) stops at the same place
    when the run is killed and resumed, whether the kill comes mid-iteration or after it."""
    # killed while the second reply is in flight: the first is cached, and still counts when the run resumes
    killed = tmp_path / "killed"
    kill_during_request(argv(killed), teacher, 2)
    assert not (killed / "metrics.jsonl").exists()
    assert llm2llm.main(argv(killed)) == 0
    assert len(teacher.requests) == 1
    assert without_timings(read_jsonl(killed / "metrics.jsonl")) == without_timings(metrics)

    # killed after iteration 0 finished: what it spent is read back from metrics.jsonl, and nothing more is asked
    (killed / "metrics.jsonl").write_text(json.dumps(metrics[0]) + "\n")
    teacher.requests.clear()
    assert llm2llm.main(argv(killed)) == 0
    assert teacher.requests == [] and without_timings(read_jsonl(killed / "metrics.jsonl")) == without_timings(metrics)


def test_a_resumed_iteration_with_every_reply_cached_loads_no_teacher(tiny_llama_dir, data_dir, tmp_path,
                                                                      monkeypatch):
    loaded = []
    real_load = llm2llm.load_model
    recording = lambda name, device, precision, role: loaded.append(role) or real_load(name, device, precision, role)  # noqa: E731
    monkeypatch.setattr(llm2llm, "load_model", recording)  # the embedded teacher
    monkeypatch.setattr(dist, "load_model", recording)  # the student
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    argv = flags(tiny_llama_dir, data_dir, tmp_path / "run", "unused")
    argv = argv[:argv.index("--teacher-url")] + argv[argv.index("--teacher-url") + 2:]  # the embedded server
    argv = [a if a != "scripted" else str(tiny_llama_dir) for a in argv] + ["--iterations", "1",
                                                                         "--teacher-max-tokens", "8"]
    assert llm2llm.main(argv) == 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert loaded == ["student", "teacher"] and metrics[0]["teacher_requests"] > 0

    # as if killed after the teacher's replies were cached but before the iteration's metrics row was written
    (tmp_path / "run" / "metrics.jsonl").unlink()
    loaded.clear()
    assert llm2llm.main(argv) == 0
    assert loaded == ["student"]
    assert without_timings(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == without_timings(metrics)


def test_a_torn_metrics_line_is_repaired_on_resume(tiny_llama_dir, data_dir, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url)) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    teacher.requests.clear()
    # killed while writing row 1 (cut mid-JSON), then while writing the end of row 1 (no newline)
    for torn in (lines[0] + "\n" + lines[1][:len(lines[1]) // 2], lines[0] + "\n" + lines[1]):
        (out / "metrics.jsonl").write_text(torn)
        assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url)) == 0
        assert "repairing" in capsys.readouterr().out
        assert without_timings(read_jsonl(out / "metrics.jsonl")) == without_timings(metrics)  # a row per line
        assert teacher.requests == []  # the redone iteration's replies came from the cache
        assert llm2llm.main(["report", str(out)]) == 0
    # a bad line before the last is not a kill's doing: it is reported, not cut away
    (out / "metrics.jsonl").write_text(lines[0] + "\n{oops\n" + lines[2] + "\n")
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, out, teacher.url))
    assert f"{out / 'metrics.jsonl'}:2" in err


def test_config_records_precision_and_prompts_and_a_resume_may_not_change_them(tiny_llama_dir, data_dir, teacher,
                                                                               tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "sst2.txt").write_bytes((rundir.PROMPTS_DIR / "sst2.txt").read_bytes())
    monkeypatch.setattr(rundir, "PROMPTS_DIR", prompts)
    out = tmp_path / "run"
    argv = flags(tiny_llama_dir, data_dir, out, teacher.url, "--iterations", "0")
    assert llm2llm.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["precision_used"] == "fp32"
    assert config["prompt_sha256"] == {"prompts/sst2.txt": hashlib.sha256((prompts / "sst2.txt").read_bytes())
                                       .hexdigest()}

    # --device and --precision may change as long as the precision they give does not; so may the URL, with a warning
    capsys.readouterr()
    assert llm2llm.main(argv + ["--device", "cpu", "--precision", "fp32", "--teacher-url", "http://other:1/v1"]) == 0
    out_text = capsys.readouterr().out
    assert f"warning: this run's teacher was {teacher.url}, now it is http://other:1/v1" in out_text
    # a run started on a GPU in bf16 cannot be resumed in fp32 on the CPU
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, precision_used="bf16")))
    err = run_error(capsys, argv)
    assert "precision: bf16 then, fp32 now" in err and "--force" in err
    (out / "config.json").write_text(json.dumps(config))
    # an edited prompt file
    with open(prompts / "sst2.txt", "a") as f:
        f.write("\nOne more rule.\n")
    err = run_error(capsys, argv)
    assert "prompts/sst2.txt was edited since the run started" in err
    assert llm2llm.main(argv + ["--force"]) == 0
    assert json.loads((out / "config.json").read_text())["prompt_sha256"]["prompts/sst2.txt"] == \
        hashlib.sha256((prompts / "sst2.txt").read_bytes()).hexdigest()
    # a precision the device cannot run is refused before anything is trained
    capsys.readouterr()
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, tmp_path / "bf16", teacher.url, "--precision", "bf16",
                                  "--device", "cpu"))
    assert "needs a CUDA device" in err and not (tmp_path / "bf16").exists()


def test_a_server_that_decodes_one_request_at_a_time_does_not_fail_the_run(tiny_llama_dir, data_dir, tmp_path,
                                                                           capsys):
    slow = ScriptedTeacher(one_at_a_time=True, delay=0.2)
    try:
        argv = flags(tiny_llama_dir, data_dir, tmp_path / "run", slow.url, "--teacher-workers", "8",
                     "--teacher-timeout", "0.5", "--iterations", "1")
        assert llm2llm.main(argv) == 0
    finally:
        slow.server.shutdown()
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics[0]["n_wrong"] >= 4 and metrics[0]["teacher_requests"] == metrics[0]["n_wrong"]
    assert "timed out" in capsys.readouterr().out  # queued requests did time out, and the run still finished

# -----------------------------------------------------------------------------
# Bad input: a message that says what to do, exit code 2, nothing lost

def run_error(capsys, argv):
    code = llm2llm.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_unknown_task_lists_the_known_ones(capsys, tmp_path):
    err = run_error(capsys, ["--task", "gsm9k", "--out", str(tmp_path / "r")])
    assert "gsm9k" in err and all(name in err for name in ("gsm8k", "sst2", "trec", "snips", "casehold"))


def test_malformed_data_names_file_and_line(capsys, data_dir, tiny_llama_dir, teacher, tmp_path):
    path = data_dir / "sst2" / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = '{"text": "cut off'
    path.write_text("\n".join(lines) + "\n")
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, tmp_path / "r", teacher.url))
    assert f"{path}:5" in err


def test_seed_size_larger_than_the_data(capsys, data_dir, tiny_llama_dir, teacher, tmp_path):
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, tmp_path / "r", teacher.url,
                                  "--seed-size", "500"))
    assert "500" in err and "16" in err


def test_empty_seed_set(capsys, data_dir, tiny_llama_dir, teacher, tmp_path):
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, tmp_path / "r", teacher.url,
                                  "--seed-size", "0"))
    assert "empty" in err


def test_an_undertrained_student_is_named_as_such(capsys):
    cfg = Config(min_steps=64, epochs=3, lr=1e-3)
    stats = {"steps": 64, "final_loss": 1.234}
    llm2llm.warn_if_undertrained(0, 28, 55, stats, cfg)  # 27 wrong: under half
    out = capsys.readouterr().out
    assert "gets 28 of its 55 seed (training) examples right" in out and "undertrained" not in out
    llm2llm.warn_if_undertrained(0, 12, 55, stats, cfg)
    out = capsys.readouterr().out
    assert "looks undertrained" in out and "43 of the 55" in out and "--min-steps (now 64)" in out


def test_missing_student_folder(capsys, data_dir, teacher, tmp_path):
    err = run_error(capsys, flags(tmp_path / "no-such-model", data_dir, tmp_path / "r", teacher.url))
    assert "no-such-model" in err and "no such folder" in err


def test_an_out_dir_with_another_configuration_is_refused(capsys, data_dir, tiny_llama_dir, teacher, tmp_path):
    out = tmp_path / "run"
    base = flags(tiny_llama_dir, data_dir, out, teacher.url)
    assert llm2llm.main(base[:base.index("--iterations") + 1] + ["0"] + base[base.index("--iterations") + 2:]) == 0
    capsys.readouterr()
    err = run_error(capsys, base)
    assert "--iterations: 0 then, 2 now" in err and "--force" in err
    assert len(read_jsonl(out / "metrics.jsonl")) == 1  # nothing was lost
    assert llm2llm.main(base + ["--force"]) == 0
    assert len(read_jsonl(out / "metrics.jsonl")) == 3


def test_report_subcommand(capsys, data_dir, tiny_llama_dir, teacher, tmp_path):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url)) == 0
    os.remove(out / "report.md")
    capsys.readouterr()
    assert llm2llm.main(["report", str(out)]) == 0
    assert "seed acc" in capsys.readouterr().out and (out / "report.md").exists()
    assert run_error(capsys, ["report", str(tmp_path / "nothing-here")])


def test_continue_training_starts_from_the_previous_adapter(tiny_llama_dir, data_dir, teacher, tmp_path,
                                                             monkeypatch):
    loaded = []
    real_load = dist.load_adapter
    monkeypatch.setattr(dist, "load_adapter", lambda model, path: loaded.append(Path(path)) or real_load(model, path))
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url, "--continue-training")) == 0
    assert loaded == [out / "iter_00" / "adapter", out / "iter_01" / "adapter"]
    loaded.clear()
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, tmp_path / "fresh", teacher.url)) == 0
    assert loaded == []  # from scratch: a fresh adapter every iteration


def test_the_api_key_is_written_nowhere(tiny_llama_dir, data_dir, teacher, tmp_path, monkeypatch, capsys):
    secret = "sk-test-DO-NOT-LEAK-7f3a9c"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url)) == 0
    assert teacher.authorization and all(a == f"Bearer {secret}" for a in teacher.authorization)  # it was used
    captured = capsys.readouterr()
    assert secret not in captured.out and secret not in captured.err
    for path, content in snapshot(out).items():
        assert secret.encode() not in content, path


def test_micro_batch_tokens_flag_takes_auto_or_a_positive_count(capsys):
    assert parse_args([]).micro_batch_tokens == "auto"
    assert parse_args(["--micro-batch-tokens", "2048"]).micro_batch_tokens == 2048
    for bad in ("lots", "0", "-5", "4096.5"):
        with pytest.raises(SystemExit):
            parse_args(["--micro-batch-tokens", bad])
        assert "must be 'auto' or a positive whole number of tokens" in capsys.readouterr().err


def test_help_is_grouped_by_concern_lists_the_subcommands_first_and_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    groups = ["data:", "student and training:", "teacher:", "teacher cost and budgets:", "the loop:",
              "run directory:", "distributed (torchrun):"]
    positions = [text.index("\n" + group + "\n") for group in groups]
    assert text.index("serve") < positions[0] and text.index("compare.py") < positions[0]  # subcommands on top
    options = re.split(r"\n  (?=--)", text)
    assert len(options) - 1 == len(Config.__dataclass_fields__)  # every flag is listed once
    for option in options[1:]:
        assert option.count("default") <= 1, option  # each default said once


def test_a_comparison_asked_of_llm2llm_points_to_its_own_command(capsys):
    for name, script in (("compare", "compare.py"), ("compare-teachers", "compare_teachers.py")):
        err = run_error(capsys, [name, "--task", "trec", "--seeds", "0,1"])
        assert f"python {script} --task trec --seeds 0,1" in err
