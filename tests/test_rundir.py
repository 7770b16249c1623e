"""The run directory under hostile input, concurrent use and faults: no code from data, one run per directory,
consistent or refused, failed starts that leave nothing behind, and Ctrl-C that stops at once.

    python -m pytest -q tests/test_rundir.py

A tiny random student and the scripted teacher of test_llm2llm.py behind real HTTP; every test is bounded in time and
talks to loopback only.
"""
import json
import re
import signal
import subprocess
import sys
import threading
import time

import torch

import compare
import llm2llm
import teacher as T
from conftest import ROOT
from test_llm2llm import data_dir, flags, read_jsonl, run_error, snapshot, teacher  # noqa: F401 (fixtures)

MARKER = "payload-ran"


class Payload:
    """What an attacker plants in a checkpoint: unpickling it would create a file (and could do anything else)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def late_error(capsys, argv):
    """An error met after the student was loaded (so a progress bar may come first): exit code 2, the message on a
    line of its own, no traceback."""
    code = llm2llm.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "\nerror: " in "\n" + err.replace("\r", "\n") and "Traceback" not in err, err
    return err


def finished_run(tiny_llama_dir, data_dir, teacher, out, *extra, capsys=None):
    argv = flags(tiny_llama_dir, data_dir, out, teacher.url, *extra)
    assert llm2llm.main(argv) == 0
    if capsys is not None:
        capsys.readouterr()  # what that run printed is not what the test reads next
    return argv


# -----------------------------------------------------------------------------
# 1. No code from data

def test_a_pickle_planted_in_train_state_does_not_run(tiny_llama_dir, data_dir, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    argv = finished_run(tiny_llama_dir, data_dir, teacher, out, "--iterations", "0", capsys=capsys)
    # the iteration is made unfinished, and its training checkpoint replaced by the attacker's file
    (out / "metrics.jsonl").unlink()
    for name in ("train_stats.json", "seed_predictions.jsonl", "test_predictions.jsonl"):
        (out / "iter_00" / name).unlink()
    marker = tmp_path / MARKER
    state = out / "iter_00" / "train_state.pt"
    torch.save({"plan": Payload(str(marker)), "step": 1, "params": [], "optimizer": {}}, state)
    with open(state, "rb") as f:
        assert MARKER.encode() in f.read()  # the payload is really in there
    err = late_error(capsys, argv)
    assert not marker.exists()  # it did not run
    assert str(state) in err and "Delete it" in err
    state.unlink()
    assert llm2llm.main(argv) == 0  # the advice works


def test_everything_loaded_from_a_run_directory_is_data():
    # every torch.load in the project reads with weights_only=True; nothing unpickles
    for path in list(ROOT.glob("*.py")) + list(ROOT.glob("bench/*.py")):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


# -----------------------------------------------------------------------------
# 2. One run per directory

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import rundir
rundir.lock({out!r})
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), out=str(out))], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_the_same_out_stops_and_a_killed_holder_blocks_nothing(tiny_llama_dir, data_dir, teacher,
                                                                                 tmp_path, capsys):
    out = tmp_path / "run"
    argv = flags(tiny_llama_dir, data_dir, out, teacher.url, "--iterations", "0")
    holder = hold_lock(out)
    try:
        err = run_error(capsys, argv)
        assert f"PID {holder.pid}" in err and "in use by another llm2llm process" in err
        assert not (out / "config.json").exists()  # it stopped at once
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert llm2llm.main(argv) == 0  # the lock died with its holder

    # a comparison folder is locked for the whole comparison
    cmp_out = tmp_path / "cmp"
    holder = hold_lock(cmp_out)
    try:
        code = compare.main(["--task", "sst2", "--out", str(cmp_out), "--seeds", "0"])
        err = capsys.readouterr().err
        assert code == 2 and f"PID {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_two_runs_started_together_on_one_out_one_stops_cleanly(tiny_llama_dir, data_dir, teacher, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "llm2llm.py"), *flags(tiny_llama_dir, data_dir, out, teacher.url,
                                                             "--iterations", "1")]
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "in use by another llm2llm process" in err and "Traceback" not in err
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 1]  # one run's rows, once
    seed = read_jsonl(out / "iter_00" / "seed_predictions.jsonl")
    assert len(seed) == len({p["id"] for p in seed}) == 6


# -----------------------------------------------------------------------------
# 3. Consistent or refused

def test_a_missing_or_damaged_adapter_a_later_step_needs_is_named(tiny_llama_dir, data_dir, teacher, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    argv = finished_run(tiny_llama_dir, data_dir, teacher, out, "--iterations", "1", "--continue-training",
                        capsys=capsys)
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    weights = out / "iter_00" / "adapter" / "adapter_model.safetensors"
    for damage in ("missing", "truncated", "config"):
        (out / "metrics.jsonl").write_text(metrics[0] + "\n")  # iteration 1 unfinished: it needs iteration 0's adapter
        for name in ("train_stats.json", "adapter"):
            path = out / "iter_01" / name
            if path.is_dir():
                for f in path.iterdir():
                    f.unlink()
                path.rmdir()
            elif path.exists():
                path.unlink()
        good = weights.read_bytes()
        config = (weights.parent / "adapter_config.json").read_text()
        if damage == "missing":
            weights.unlink()
        elif damage == "truncated":
            weights.write_bytes(good[:len(good) // 2])
        else:
            (weights.parent / "adapter_config.json").write_text("{not json")
        err = late_error(capsys, argv)
        named = weights.parent / "adapter_config.json" if damage == "config" else weights
        assert str(named) in err and "--continue-training" in err, err
        weights.write_bytes(good)
        (weights.parent / "adapter_config.json").write_text(config)
    assert llm2llm.main(argv) == 0


def test_compare_refuses_to_share_a_damaged_first_student(tiny_llama_dir, data_dir, teacher, tmp_path, capsys):
    argv = ["--task", "sst2", "--data-dir", str(data_dir), "--student", str(tiny_llama_dir), "--teacher-url",
            teacher.url, "--teacher-model", "scripted", "--seed-size", "6", "--iterations", "1", "--epochs", "1",
            "--min-steps", "0", "--max-new-tokens", "4", "--test-limit", "4", "--seeds", "0", "--arms",
            "llm2llm", "--bootstrap-resamples", "100", "--out", str(tmp_path / "cmp")]
    assert compare.main(argv) == 0
    weights = tmp_path / "cmp" / "llm2llm-seed0" / "iter_00" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 16)
    code = compare.main(argv[:-6] + ["--arms", "llm2llm,finetune"] + argv[-4:])
    err = capsys.readouterr().err
    assert code == 2 and str(weights) in err and "Traceback" not in err, err
    assert not (tmp_path / "cmp" / "finetune-seed0" / "iter_00" / "adapter").exists()  # nothing damaged was copied


def test_a_damaged_config_a_missing_config_and_an_edited_seed_set_are_refused(tiny_llama_dir, data_dir, teacher,
                                                                               tmp_path, capsys):
    out = tmp_path / "run"
    argv = finished_run(tiny_llama_dir, data_dir, teacher, out, "--iterations", "0", capsys=capsys)
    config = (out / "config.json").read_text()
    assert json.loads(config)["seed_sha256"]

    (out / "config.json").write_text(config[:len(config) // 2])
    err = run_error(capsys, argv)
    assert f"{out / 'config.json'} is not a JSON object" in err and "--force" in err
    (out / "config.json").write_text("[1, 2]")
    assert "is not a JSON object" in run_error(capsys, argv)

    (out / "config.json").unlink()
    err = run_error(capsys, argv)
    assert "holds iteration folders but no config.json" in err

    (out / "config.json").write_text(config)
    seed = (out / "seed.jsonl").read_text().splitlines()
    (out / "seed.jsonl").write_text("\n".join(seed[1:] + seed[:1]) + "\n")  # the same rows, another order
    err = run_error(capsys, argv)
    assert f"{out / 'seed.jsonl'} no longer holds the seed set this run started with" in err
    assert "rerun the same command" not in err  # rerunning cannot get past this
    assert llm2llm.main(argv + ["--force"]) == 0  # --force starts over


def test_cache_entries_of_the_wrong_shape_are_a_miss_with_a_warning(teacher, tmp_path, capsys):
    cache = tmp_path / "cache"
    client = T.Teacher(teacher.url, "scripted", cache_dir=str(cache), workers=1, seed=0)
    job = {"messages": [{"role": "user", "content": "Write 1 new snippet.\nText: a fine film\nLabel: positive"}]}
    [first] = client.chat_many([job], progress=False)
    path = cache / first["cache_key"][:2] / f"{first['cache_key']}.json"
    good = json.loads(path.read_text())
    bad_entries = [dict(good, choices="a string"), dict(good, choices=[{"text": 3, "finish_reason": "stop"}]),
                   dict(good, choices=[]), dict(good, prompt_tokens=-50), dict(good, completion_tokens=2.5),
                   dict(good, prompt_tokens="12"), [1, 2], "{", dict(good, choices=[["text"]])]
    for bad in bad_entries:
        path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        teacher.requests.clear()
        client = T.Teacher(teacher.url, "scripted", cache_dir=str(cache), workers=1, seed=0)
        [result] = client.chat_many([job], progress=False)
        assert result["error"] is None and not result["cached"] and len(teacher.requests) == 1  # asked again
        assert result["prompt_tokens"] >= 0 and client.tokens_used >= 0
        assert f"warning: {path}" in capsys.readouterr().out
        assert json.loads(path.read_text())["choices"] == result["choices"]  # and replaced by the good reply
    # a good entry is a hit, with no warning
    teacher.requests.clear()
    [again] = T.Teacher(teacher.url, "scripted", cache_dir=str(cache), workers=1, seed=0).chat_many([job],
                                                                                                   progress=False)
    assert again["cached"] and teacher.requests == [] and "warning" not in capsys.readouterr().out


# -----------------------------------------------------------------------------
# 4. Failed starts leave nothing behind

def test_a_failed_start_leaves_nothing_that_refuses_the_corrected_command(tiny_llama_dir, data_dir, teacher,
                                                                          tmp_path, capsys):
    out = tmp_path / "run"
    run_error(capsys, flags(tiny_llama_dir, data_dir, out, teacher.url, "--seed-size", "0"))
    assert not out.exists()
    # a student folder that does not exist: found only once the run directory was opened
    err = late_error(capsys, flags(tmp_path / "no-such-model", data_dir, out, teacher.url, "--iterations", "0"))
    assert "no-such-model" in err and "rerun the same command" not in err
    before = snapshot(out)
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url, "--iterations", "0")) == 0  # no --force
    assert "nothing was computed there yet" in capsys.readouterr().out
    assert snapshot(out) != before and json.loads((out / "config.json").read_text())["student"] == str(tiny_llama_dir)


def test_a_bad_middle_line_in_metrics_says_what_to_do_and_no_rerun_hint(tiny_llama_dir, data_dir, teacher, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    argv = finished_run(tiny_llama_dir, data_dir, teacher, out, capsys=capsys)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n{oops\n" + lines[2] + "\n")
    err = run_error(capsys, argv)
    assert f"{out / 'metrics.jsonl'}:2" in err and "delete it and every line after it" in err
    assert "rerun the same command" not in err
    code = llm2llm.main(["report", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "line 2" in err and "delete it and every line after it" in err


# -----------------------------------------------------------------------------
# 5. Ctrl-C stops within seconds

def test_ctrl_c_during_teacher_requests_stops_within_seconds(tiny_llama_dir, data_dir, teacher, tmp_path):
    out = tmp_path / "run"
    argv = flags(tiny_llama_dir, data_dir, out, teacher.url, "--iterations", "1", "--teacher-workers", "4")
    teacher.hold_request = 1  # the first request is held open for 60 s; the others are answered
    proc = subprocess.Popen([sys.executable, str(ROOT / "llm2llm.py"), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in proc.stderr), daemon=True)
    reader.start()
    try:
        assert teacher.holding.wait(timeout=240), "the run never reached the teacher"
        time.sleep(1.0)  # the other requests finish and are cached
        start = time.time()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
        exited = time.time() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        teacher.release.set()
    reader.join(timeout=10)
    err = "".join(line for _, line in lines)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    # the loop stops at once, not when the held request ends (60 s): the work is over within seconds, and the
    # process is gone long before the request would have come back (the rest of the exit is the interpreter's
    # own shutdown, which a loaded machine makes slow)
    stopped = next(t for t, line in lines if "interrupted" in line) - start
    assert stopped < 5, f"'interrupted' came {stopped:.1f} s after Ctrl-C"
    assert exited < 40, f"the process exited {exited:.1f} s after Ctrl-C"
    # only complete replies were cached: the held request's reply never came, so it is not there
    held = teacher.requests[0]
    cached = [json.loads(p.read_text()) for p in (out / "teacher_cache").rglob("*.json")]
    assert held["messages"] not in [c["request"]["messages"] for c in cached]
    assert len(cached) == len(teacher.requests) - 1
