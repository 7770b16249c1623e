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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import llm2llm
from conftest import ROOT

POSITIVE = ["a gorgeous , witty , seductive movie", "the film is a delight from start to finish",
            "one of the most moving films of the year", "a smart and funny comedy", "beautifully shot and acted",
            "an uplifting , heartfelt story", "clever writing and a great cast", "it is a triumph"]
NEGATIVE = ["a tedious , overlong mess", "the plot makes no sense at all", "dull characters and flat jokes",
            "a waste of a talented cast", "painfully slow and boring", "the worst film of the summer",
            "a cynical , lazy sequel", "it never comes together"]
METRIC_KEYS = {"iteration", "train_size", "n_seed", "n_wrong", "n_augmented", "n_rejected", "seed_acc", "test_acc",
               "teacher_prompt_tokens", "teacher_completion_tokens", "train_tokens", "train_seconds", "eval_seconds"}
TIMING_KEYS = {"train_seconds", "eval_seconds", "teacher_seconds"}


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
# request, records the requests, and can hold a chosen request open so the test can kill the client mid-call.

class ScriptedTeacher:
    def __init__(self):
        self.requests, self.hold_request, self.authorization = [], None, []
        self.holding, self.release = threading.Event(), threading.Event()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                teacher.requests.append(request)
                teacher.authorization.append(self.headers.get("Authorization"))
                if teacher.hold_request == len(teacher.requests):
                    teacher.holding.set()
                    teacher.release.wait(60)  # the client is killed while it waits
                user = request["messages"][-1]["content"]
                digest = hashlib.sha256((user + str(request.get("seed"))).encode()).hexdigest()
                words = " ".join("w" + digest[i:i + 5] for i in range(0, 30, 5))
                label = "positive" if int(digest[0], 16) % 2 else "negative"
                text = f"Here is one new snippet.\n1. Text: {words}\nLabel: {label}\n"
                self._send({"id": "x", "object": "chat.completion", "model": request["model"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": len(user.split()), "completion_tokens": 12,
                                      "total_tokens": len(user.split()) + 12}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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


def test_a_kill_during_teacher_calls_resumes_to_the_same_metrics(tiny_llama_dir, data_dir, teacher, tmp_path):
    reference = tmp_path / "reference"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, reference, teacher.url)) == 0
    n_reference = len(teacher.requests)

    # a real process, killed with SIGKILL while the second teacher request of iteration 0 is in flight
    killed = tmp_path / "killed"
    teacher.requests.clear()
    teacher.hold_request = 2
    proc = subprocess.Popen([sys.executable, str(ROOT / "llm2llm.py"),
                             *flags(tiny_llama_dir, data_dir, killed, teacher.url)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert teacher.holding.wait(timeout=240), "the run never reached its second teacher request"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "metrics.jsonl").exists()  # it really died mid-iteration
    teacher.hold_request = None
    teacher.requests.clear()

    assert llm2llm.main(flags(tiny_llama_dir, data_dir, killed, teacher.url)) == 0
    # the finished first reply came from the cache: one request fewer than a run from scratch
    assert len(teacher.requests) == n_reference - 1
    assert without_timings(read_jsonl(killed / "metrics.jsonl")) == \
        without_timings(read_jsonl(reference / "metrics.jsonl"))
    for i in range(3):
        for name in ("augmented.jsonl", "seed_predictions.jsonl", "test_predictions.jsonl"):
            assert read_jsonl(killed / f"iter_{i:02d}" / name) == read_jsonl(reference / f"iter_{i:02d}" / name)


def test_unreachable_teacher_stops_cleanly_and_the_rerun_resumes(tiny_llama_dir, data_dir, teacher, tmp_path,
                                                                 capsys):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, "http://127.0.0.1:9/v1")) == 2
    err = capsys.readouterr().err
    assert "cannot reach the teacher" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"kept in {out}: rerun the same command to continue" in err
    adapter = out / "iter_00" / "adapter" / "adapter_model.safetensors"
    assert adapter.exists() and (out / "iter_00" / "seed_predictions.jsonl").exists()
    trained = adapter.read_bytes()
    # same flags with a working teacher: iteration 0 is not trained again
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url)) == 0
    assert adapter.read_bytes() == trained
    assert len(read_jsonl(out / "metrics.jsonl")) == 3


def test_a_failed_run_without_out_says_which_out_resumes_it(tiny_llama_dir, data_dir, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    argv = flags(tiny_llama_dir, data_dir, "unused", "http://127.0.0.1:9/v1")
    argv = argv[:argv.index("--out")] + ["--iterations", "1"]
    assert llm2llm.main(argv) == 2
    err = capsys.readouterr().err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and f"rerun the same command with --out {Path('runs') / runs[0].name}" in err


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


def test_malformed_data_names_file_and_line(capsys, data_dir, tiny_llama_dir, tmp_path):
    path = data_dir / "sst2" / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = '{"text": "cut off'
    path.write_text("\n".join(lines) + "\n")
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, tmp_path / "r", "http://127.0.0.1:9/v1"))
    assert f"{path}:5" in err


def test_seed_size_larger_than_the_data(capsys, data_dir, tiny_llama_dir, tmp_path):
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, tmp_path / "r", "http://127.0.0.1:9/v1",
                                  "--seed-size", "500"))
    assert "500" in err and "16" in err


def test_empty_seed_set(capsys, data_dir, tiny_llama_dir, tmp_path):
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, tmp_path / "r", "http://127.0.0.1:9/v1",
                                  "--seed-size", "0"))
    assert "empty" in err


def test_an_undertrained_student_is_named_as_such(capsys):
    cfg = llm2llm.Config(min_steps=64, epochs=3, lr=1e-3)
    stats = {"steps": 64, "final_loss": 1.234}
    llm2llm.warn_if_undertrained(0, 28, 55, stats, cfg)  # 27 wrong: under half
    out = capsys.readouterr().out
    assert "gets 28 of its 55 seed (training) examples right" in out and "undertrained" not in out
    llm2llm.warn_if_undertrained(0, 12, 55, stats, cfg)
    out = capsys.readouterr().out
    assert "looks undertrained" in out and "43 of the 55" in out and "--min-steps (now 64)" in out


def test_missing_student_folder(capsys, data_dir, tmp_path):
    err = run_error(capsys, flags(tmp_path / "no-such-model", data_dir, tmp_path / "r", "http://127.0.0.1:9/v1"))
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
    real_load = llm2llm.load_adapter
    monkeypatch.setattr(llm2llm, "load_adapter", lambda model, path: loaded.append(Path(path)) or real_load(model, path))
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
