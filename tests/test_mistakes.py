"""--mistakes: which seed examples count as wrong (train, heldout:K, early:F), end to end and against hand checks.

    python -m pytest -q tests/test_mistakes.py

A tiny random student, the scripted teacher of test_llm2llm.py behind real HTTP, the small SST-2 fixture. Checked:
the folds are deterministic and stratified; no fold trains on its own seed rows or on a teacher example descended
from them (read back from the run directory and its provenance); a kill during fold training, or right after the
early evaluation, resumes to the same metrics without redoing finished work; early:F evaluates after the promised
optimizer step; the metrics, mistakes.jsonl and the report say what was flagged and how; and compare runs one
llm2llm arm per mode.
"""
import json
from collections import Counter

import pytest
import torch

import compare
import llm2llm
from test_llm2llm import (TIMING_KEYS, data_dir, flags, read_jsonl, run_error,  # noqa: F401 (fixtures)
                          teacher)
from tasks import get_task

TIMINGS = TIMING_KEYS | {"mistakes_seconds"}


def without_timings(metrics):
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


# -----------------------------------------------------------------------------
# Folds and provenance

def labelled_seed(counts):
    return [{"id": f"s{k}-{label}", "text": f"t{k}", "label": label}
            for label, n in counts.items() for k in range(n)]


def test_folds_are_deterministic_stratified_and_cover_the_seed_set_once():
    task = get_task("sst2")
    seed_rows = labelled_seed({"positive": 7, "negative": 4})
    folds = llm2llm.split_folds(task, seed_rows, 3, seed=5, iteration=1)
    assert folds == llm2llm.split_folds(task, seed_rows, 3, seed=5, iteration=1)  # deterministic
    assert sorted(sum(folds, [])) == sorted(row["id"] for row in seed_rows)  # each seed in exactly one fold
    assert sorted(len(f) for f in folds) == [3, 4, 4]  # sizes differ by at most one
    order = [row["id"] for row in seed_rows]
    for fold in folds:
        assert fold == sorted(fold, key=order.index)  # in seed order
        labels = Counter(seed_id.split("-")[1] for seed_id in fold)
        assert labels["positive"] in (2, 3) and labels["negative"] in (1, 2)  # each label spread evenly
    # another seed or iteration deals differently
    others = {str(llm2llm.split_folds(task, seed_rows, 3, seed=s, iteration=i)) for s in range(4) for i in range(4)}
    assert len(others) > 8
    # a number task has one stratum: the folds are a plain seeded split
    gsm = [{"id": f"q{k}", "question": "?", "answer": "#### 1"} for k in range(10)]
    assert sorted(len(f) for f in llm2llm.split_folds(get_task("gsm8k"), gsm, 4, 0, 0)) == [2, 2, 3, 3]


def test_held_out_rows_take_their_descendants_with_them():
    rows = [{"id": "a"}, {"id": "b"}, {"id": "c"},
            {"id": "a1", "provenance": {"parent_id": "a"}}, {"id": "b1", "provenance": {"parent_id": "b"}},
            {"id": "a11", "provenance": {"parent_id": "a1"}},  # a grandchild, should a chain ever form
            {"id": "x1", "provenance": {"parent_id": "gone"}}]  # a parent not in the rows
    assert [r["id"] for r in llm2llm.without_descendants(rows, {"a"})] == ["b", "c", "b1", "x1"]
    assert [r["id"] for r in llm2llm.without_descendants(rows, {"gone", "c"})] == ["a", "b", "a1", "b1", "a11"]
    assert llm2llm.without_descendants(rows, set()) == rows


def test_bad_mistakes_flags_say_what_to_do(capsys, data_dir, teacher, tmp_path):
    for bad in ("heldout", "heldout:1", "heldout:x", "early:1", "early:0", "early", "train:2", "later"):
        err = run_error(capsys, flags("unused", data_dir, tmp_path / "r", teacher.url, "--mistakes", bad))
        assert f"--mistakes {bad!r}" in err and "heldout:K" in err
    err = run_error(capsys, flags("unused", data_dir, tmp_path / "r", teacher.url, "--mistakes", "heldout:7"))
    assert "7 folds need at least 7 seed examples" in err and not (tmp_path / "r").exists()
    err = run_error(capsys, flags("unused", data_dir, tmp_path / "r", teacher.url, "--random-parents", "2,1"))
    assert "--augment random" in err
    err = run_error(capsys, flags("unused", data_dir, tmp_path / "r", teacher.url, "--augment", "random",
                                  "--random-parents", "2,-1"))
    assert "counts of 0 or more" in err


# -----------------------------------------------------------------------------
# heldout:K end to end

def test_heldout_folds_never_train_on_what_they_hold_out(tiny_llama_dir, data_dir, teacher, tmp_path):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url, "--mistakes", "heldout:2")) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    seed_ids = {row["id"] for row in read_jsonl(out / "seed.jsonl")}
    excluded_by_descent = 0
    for i in (0, 1):
        step = out / f"iter_{i:02d}"
        data = read_jsonl(step / "train.jsonl")
        by_id = {row["id"]: row for row in data}
        held_all, flagged = [], set()
        for j in (0, 1):
            fold = step / "folds" / f"fold_{j}"
            summary = json.loads((fold / "fold.json").read_text())
            held = set(summary["heldout_ids"])
            held_all += summary["heldout_ids"]
            assert (fold / "adapter" / "adapter_model.safetensors").exists()
            assert json.loads((fold / "train_stats.json").read_text())["steps"] > 0
            predictions = read_jsonl(fold / "predictions.jsonl")
            assert {p["id"] for p in predictions} == held  # the fold's adapter answered its own held-out seeds
            flagged |= {p["id"] for p in predictions if not p["correct"]}

            def ancestors(row):  # up the provenance chain, independently of the code under test
                while row is not None:
                    yield row["id"]
                    parent = (row.get("provenance") or {}).get("parent_id")
                    row = by_id.get(parent) if parent else None

            trained = [by_id[k] for k in summary["train_ids"]]
            assert not any(a in held for row in trained for a in ancestors(row))
            # ...and nothing else was left out: every row not descended from the fold was trained on
            expected = [row["id"] for row in data if not any(a in held for a in ancestors(row))]
            assert summary["train_ids"] == expected
            excluded_by_descent += sum(1 for row in data if row["id"] not in held and row["id"] not in
                                       set(summary["train_ids"]))
        assert sorted(held_all) == sorted(seed_ids)
        # the mistakes are what the held-out adapters got wrong, and the teacher was sent exactly those
        mistakes = read_jsonl(step / "mistakes.jsonl")
        assert {m["id"] for m in mistakes} == flagged and metrics[i]["n_wrong"] == len(flagged)
        assert all(m["mistakes"] == "heldout:2" and "held out" in m["by"] for m in mistakes)
        parents = {a["provenance"]["parent_id"] for a in read_jsonl(step / "augmented.jsonl")}
        assert parents <= flagged and metrics[i]["n_parents"] == len(flagged)
        wrong_train = [p for p in read_jsonl(step / "seed_predictions.jsonl") if not p["correct"]]
        assert metrics[i]["n_wrong_train"] == len(wrong_train) and metrics[i]["mistakes"] == "heldout:2"
        assert metrics[i]["mistakes_seconds"] > 0
    assert excluded_by_descent > 0  # iteration 1 held out teacher examples with their parents: not vacuous
    # the last student has no teacher round after it: no folds, its mistakes are the plain count
    assert not (out / "iter_02" / "folds").exists() and metrics[2]["mistakes"] == "train"
    report = (out / "report.md").read_text()
    assert "## Seed examples flagged as mistakes" in report and "wrong when held out (fold" in report
    assert "wrong after training" in report and "mistakes time" in report


def test_a_kill_during_fold_training_resumes_at_that_fold(tiny_llama_dir, data_dir, teacher, tmp_path, monkeypatch):
    argv = lambda out: flags(tiny_llama_dir, data_dir, out, teacher.url, "--mistakes", "heldout:3",  # noqa: E731
                             "--iterations", "1")
    reference = tmp_path / "reference"
    assert llm2llm.main(argv(reference)) == 0

    real_train, trainings = llm2llm.train, []

    def killed_in_fold_1(*args, **kwargs):
        trainings.append(kwargs["checkpoint_path"])
        if "fold_1" in kwargs["checkpoint_path"]:
            def kill(step, total):
                if step == 2:
                    raise KeyboardInterrupt
            kwargs["on_step"] = kill
        return real_train(*args, **kwargs)

    killed = tmp_path / "killed"
    monkeypatch.setattr(llm2llm, "train", killed_in_fold_1)
    assert llm2llm.main(argv(killed)) == 130
    assert [p.split("/")[-2] for p in trainings] == ["iter_00", "fold_0", "fold_1"]
    assert not (killed / "metrics.jsonl").exists()

    trainings.clear()
    monkeypatch.setattr(llm2llm, "train", lambda *a, **k: trainings.append(k["checkpoint_path"]) or real_train(*a, **k))
    assert llm2llm.main(argv(killed)) == 0
    # the main student and fold 0 were finished: neither is trained again; fold 1 starts over, then fold 2
    assert [p.split("/")[-2] for p in trainings][:2] == ["fold_1", "fold_2"]
    assert without_timings(read_jsonl(killed / "metrics.jsonl")) == without_timings(read_jsonl(reference /
                                                                                               "metrics.jsonl"))
    for j in range(3):
        fold = f"iter_00/folds/fold_{j}/predictions.jsonl"
        assert read_jsonl(killed / fold) == read_jsonl(reference / fold)
    assert read_jsonl(killed / "iter_00" / "mistakes.jsonl") == read_jsonl(reference / "iter_00" / "mistakes.jsonl")


# -----------------------------------------------------------------------------
# early:F end to end

def test_early_evaluates_after_the_promised_step_and_flags_either_point(tiny_llama_dir, data_dir, teacher, tmp_path,
                                                                        monkeypatch):
    events = []
    real_step, real_train, real_evaluate = torch.optim.AdamW.step, llm2llm.train, llm2llm.evaluate

    def step(self, *args, **kwargs):
        events.append("step")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(llm2llm, "train", lambda *a, **k: events.append("train") or real_train(*a, **k))
    monkeypatch.setattr(llm2llm, "evaluate", lambda *a: events.append(a[-1]) or real_evaluate(*a))
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url, "--mistakes", "early:0.3",
                              "--train-steps", "10", "--iterations", "1", "--lr", "5e-3")) == 0
    # iteration 0: 10 steps, evaluated after round(0.3 * 10) = 3 of them, once; the last iteration is not searched
    first = events[events.index("train"):events.index("train", 1)]
    assert [e for e in first if e != "step"] == ["train", "iter 0 seed eval at step 3", "iter 0 seed eval",
                                                  "iter 0 test eval"]
    assert first.index("iter 0 seed eval at step 3") == 1 + 3  # "train" and three optimizer steps before it
    assert first.count("step") == 10
    assert not any("at step" in e for e in events[events.index("train", 1):])
    early = json.loads((out / "iter_00" / "early_eval.json").read_text())
    assert (early["step"], early["steps"]) == (3, 10)

    metrics = read_jsonl(out / "metrics.jsonl")
    wrong_early = {p["id"] for p in read_jsonl(out / "iter_00" / "seed_predictions_early.jsonl") if not p["correct"]}
    wrong_end = {p["id"] for p in read_jsonl(out / "iter_00" / "seed_predictions.jsonl") if not p["correct"]}
    mistakes = {m["id"]: m["by"] for m in read_jsonl(out / "iter_00" / "mistakes.jsonl")}
    assert set(mistakes) == wrong_early | wrong_end and metrics[0]["n_wrong"] == len(wrong_early | wrong_end)
    assert metrics[0]["n_wrong_train"] == len(wrong_end) and metrics[0]["early_step"] == 3
    for seed_id, by in mistakes.items():
        assert ("at step 3 of 10" in by) == (seed_id in wrong_early)
        assert ("at the end" in by) == (seed_id in wrong_end)
    assert wrong_early - wrong_end  # the early point flagged something the end did not: not vacuous


def test_a_kill_right_after_the_early_evaluation_resumes_to_the_same_metrics(tiny_llama_dir, data_dir, teacher,
                                                                             tmp_path, monkeypatch):
    argv = lambda out: flags(tiny_llama_dir, data_dir, out, teacher.url, "--mistakes", "early:0.5",  # noqa: E731
                             "--iterations", "1")
    reference = tmp_path / "reference"
    assert llm2llm.main(argv(reference)) == 0

    real_evaluate, real_generate = llm2llm.evaluate, llm2llm.generate

    def killed_after_early(*args):
        result = real_evaluate(*args)
        if "at step" in args[-1]:
            raise KeyboardInterrupt
        return result

    killed = tmp_path / "killed"
    monkeypatch.setattr(llm2llm, "evaluate", killed_after_early)
    assert llm2llm.main(argv(killed)) == 130
    assert (killed / "iter_00" / "seed_predictions_early.jsonl").exists()
    assert not (killed / "iter_00" / "adapter").exists()  # killed during iteration 0's fine-tune
    early = (killed / "iter_00" / "seed_predictions_early.jsonl").read_bytes()

    inside_early, decoded = [], []

    def evaluate(*args):
        inside_early.append("at step" in args[-1])
        try:
            return real_evaluate(*args)
        finally:
            inside_early.pop()

    monkeypatch.setattr(llm2llm, "evaluate", evaluate)
    monkeypatch.setattr(llm2llm, "generate", lambda *a, **k: decoded.append(any(inside_early)) or
                        real_generate(*a, **k))
    assert llm2llm.main(argv(killed)) == 0
    assert decoded and not any(decoded)  # the early evaluation was read back, not decoded again
    assert (killed / "iter_00" / "seed_predictions_early.jsonl").read_bytes() == early
    assert without_timings(read_jsonl(killed / "metrics.jsonl")) == without_timings(read_jsonl(reference /
                                                                                               "metrics.jsonl"))
    for name in ("seed_predictions.jsonl", "test_predictions.jsonl", "mistakes.jsonl", "augmented.jsonl"):
        assert read_jsonl(killed / "iter_00" / name) == read_jsonl(reference / "iter_00" / name), name


# -----------------------------------------------------------------------------
# compare: one llm2llm arm per mode

def test_compare_runs_one_llm2llm_arm_per_mode(tiny_llama_dir, data_dir, teacher, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "cmp"
    argv = ["--task", "sst2", "--data-dir", str(data_dir), "--student", str(tiny_llama_dir),
            "--teacher-url", teacher.url, "--teacher-model", "scripted", "--seed-size", "6", "--iterations", "1",
            "--epochs", "4", "--min-steps", "0", "--lr", "5e-3", "--batch-size", "4", "--max-new-tokens", "4",
            "--test-limit", "4", "--teacher-workers", "1", "--mistakes", "heldout:2", "--seeds", "0",
            "--arms", "finetune,llm2llm,llm2llm:train,llm2llm:early:0.5,llm2llm:heldout:2,random",
            "--bootstrap-resamples", "200", "--out", str(out)]
    assert compare.main(argv) == 0
    summary = json.loads((out / "compare.json").read_text())
    # llm2llm:heldout:2 is llm2llm itself (--mistakes heldout:2): run once
    assert list(summary["results"]) == ["llm2llm", "finetune", "llm2llm:train", "llm2llm:early:0.5", "random"]
    assert set(summary["paired"]) == {"finetune", "llm2llm:train", "llm2llm:early:0.5", "random"}
    runs = {arm: out / f"{arm.replace(':', '-')}-seed0" for arm in summary["results"]}
    configs = {arm: json.loads((run / "config.json").read_text()) for arm, run in runs.items()}
    assert configs["llm2llm"]["mistakes"] == "heldout:2" and configs["llm2llm:train"]["mistakes"] == "train"
    assert configs["llm2llm:early:0.5"]["mistakes"] == "early:0.5"
    metrics = {arm: read_jsonl(run / "metrics.jsonl") for arm, run in runs.items()}
    # every arm starts from one first student; early trains its own (it evaluates part-way through that fine-tune),
    # and it comes out the same: the evaluation on the way changes nothing in training
    for arm in ("llm2llm:train", "llm2llm:early:0.5", "finetune", "random"):
        assert read_jsonl(runs[arm] / "iter_00" / "test_predictions.jsonl") == \
            read_jsonl(runs["llm2llm"] / "iter_00" / "test_predictions.jsonl"), arm
    a = load_file(runs["llm2llm"] / "iter_00" / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["llm2llm:early:0.5"] / "iter_00" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (runs["llm2llm:early:0.5"] / "iter_00" / "early_eval.json").exists()
    assert not (runs["llm2llm:train"] / "iter_00" / "folds").exists()
    # each mode found its own mistakes on that student, and the plain count is the same in all
    first = {arm: m[0] for arm, m in metrics.items()}
    assert len({first[arm]["n_wrong_train"] for arm in first}) == 1
    assert first["llm2llm:train"]["n_wrong"] == first["llm2llm:train"]["n_wrong_train"]
    assert [first[arm]["mistakes"] for arm in ("llm2llm", "llm2llm:train", "llm2llm:early:0.5")] == \
        ["heldout:2", "train", "early:0.5"]
    # random drew as many parents as llm2llm sent, in every iteration
    assert [m["n_parents"] for m in metrics["random"]] == [m["n_parents"] for m in metrics["llm2llm"]]
    assert configs["random"]["random_parents"] == ",".join(str(m["n_parents"]) for m in metrics["llm2llm"])
    assert "llm2llm:early:0.5" in (out / "compare.md").read_text()
