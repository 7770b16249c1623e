"""`llm2llm.py compare` end to end, and its statistics against hand computations.

    python -m pytest -q tests/test_compare.py

A tiny random student, a scripted teacher behind real HTTP and a small SST-2 fixture. With a high learning rate the
student learns one label, so it gets some seed examples right and some wrong, which is what tells the arms apart:
llm2llm sends the wrong ones, `all` every one, `random` a draw of as many. Checked: the parents each arm sent, the
budgets of finetune-matched (optimizer steps) and oneshot (teacher examples), the numbers in compare.json, and that
a comparison interrupted in the middle of a run resumes to the same compare.json.
"""
import hashlib
import json
import math
import re
import threading
import xml.dom.minidom
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import compare
import dist
import llm2llm
from config import Config
from conftest import ScriptedHandler, load_pretrained
from lora import add_lora
from tasks import get_task
from train import train

POSITIVE = ["a gorgeous , witty , seductive movie", "the film is a delight from start to finish",
            "one of the most moving films of the year", "a smart and funny comedy", "beautifully shot and acted",
            "an uplifting , heartfelt story", "clever writing and a great cast", "it is a triumph"]
NEGATIVE = ["a tedious , overlong mess", "the plot makes no sense at all", "dull characters and flat jokes",
            "a waste of a talented cast", "painfully slow and boring", "the worst film of the summer",
            "a cynical , lazy sequel", "it never comes together"]
TEST = [("a warm and wise film", "positive"), ("a chore to sit through", "negative"),
        ("sharp , funny and true", "positive"), ("lifeless and forgettable", "negative"),
        ("a joy from the first scene", "positive"), ("flat , grim and long", "negative")]
ALL_ARMS = "finetune,finetune-matched,llm2llm,all,random,continue,oneshot"
SEEDS = (0, 1)
ITERATIONS = 2


# -----------------------------------------------------------------------------
# A scripted teacher: answers with as many new, unique SST-2 snippets as the message asks for ("Write N new"),
# derived from a hash of the request, and records every request it receives.

class ScriptedTeacher:
    def __init__(self):
        self.requests = []
        teacher = self

        class Handler(ScriptedHandler):

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                teacher.requests.append(request)
                user = request["messages"][-1]["content"]
                n = int(re.search(r"Write (?:exactly )?(\d+) new", user).group(1))
                items = []
                for k in range(n):
                    digest = hashlib.sha256(f"{user}|{request.get('seed')}|{k}".encode()).hexdigest()
                    words = " ".join("w" + digest[i:i + 5] for i in range(0, 30, 5))
                    label = "positive" if int(digest[0], 16) % 2 else "negative"
                    items.append(f"{k + 1}. Text: {words}\nLabel: {label}")
                self._send({"id": "x", "object": "chat.completion", "model": request["model"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "\n".join(items)},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": len(user.split()), "completion_tokens": 12 * n,
                                      "total_tokens": len(user.split()) + 12 * n}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seed_texts_sent(self):
        """The example each request asked about: the last 'Text:' line of the user message."""
        return [re.findall(r"Text: (.*)", r["messages"][-1]["content"])[-1].strip() for r in self.requests]


@pytest.fixture(scope="module")
def teacher():
    t = ScriptedTeacher()
    yield t
    t.server.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-data")
    (root / "sst2").mkdir()
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [{"text": t, "label": "negative"} for t in NEGATIVE]
    with open(root / "sst2" / "train.jsonl", "w") as f:
        for row in rows[::2] + rows[1::2]:
            f.write(json.dumps(row) + "\n")
    with open(root / "sst2" / "test.jsonl", "w") as f:
        for text, label in TEST:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return root


def compare_argv(student, data_dir, out, teacher_url, arms=ALL_ARMS):
    return ["--task", "sst2", "--data-dir", str(data_dir), "--student", str(student),
            "--teacher-url", teacher_url, "--teacher-model", "scripted", "--seed-size", "6",
            "--iterations", str(ITERATIONS), "--epochs", "4", "--min-steps", "0", "--lr", "2e-2", "--batch-size", "4",
            "--max-new-tokens", "4", "--teacher-workers", "1", "--arms", arms,
            "--seeds", ",".join(map(str, SEEDS)), "--bootstrap-resamples", "2000", "--out", str(out)]


@pytest.fixture(scope="module")
def comparison(tiny_llama_dir, data_dir, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison") / "cmp"
    assert compare.main(compare_argv(tiny_llama_dir, data_dir, out, teacher.url)) == 0
    return {"out": out, "requests": list(teacher.requests), "sent": teacher.seed_texts_sent()}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def metrics(run_dir):
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def steps(run_dir, iteration):
    return json.loads((Path(run_dir) / f"iter_{iteration:02d}" / "train_stats.json").read_text())["steps"]


def without_seconds(summary):
    return {k: v for k, v in summary.items() if k != "seconds"}


# -----------------------------------------------------------------------------
# The arms

def test_each_arm_sends_its_parents_and_only_seed_examples(comparison):
    out = comparison["out"]
    targeted_somewhere = random_differs_somewhere = random_budget_differs = False
    seed_texts = set()
    for seed in SEEDS:
        seed_rows = read_jsonl(out / f"llm2llm-seed{seed}" / "seed.jsonl")
        seed_ids = [row["id"] for row in seed_rows]
        seed_texts |= {row["text"] for row in seed_rows}
        for arm in ("llm2llm", "all", "random", "continue", "oneshot"):
            run = out / f"{arm}-seed{seed}"
            assert read_jsonl(run / "seed.jsonl") == seed_rows  # every arm of a seed starts from the same seed set
            per_wrong = json.loads((run / "config.json").read_text())["aug_per_wrong"]
            rounds = 1 if arm == "oneshot" else ITERATIONS
            for m in metrics(run)[:rounds]:
                step = run / f"iter_{m['iteration']:02d}"
                wrong = sorted(p["id"] for p in read_jsonl(step / "seed_predictions.jsonl") if not p["correct"])
                assert read_jsonl(step / "rejected.jsonl") == []  # so the accepted rows show every parent asked
                parents = [row["provenance"]["parent_id"] for row in read_jsonl(step / "augmented.jsonl")]
                assert sorted(set(parents)) == sorted(set(parents) & set(seed_ids))  # seed examples only
                assert sorted(parents) == sorted(list(set(parents)) * per_wrong)  # each parent asked for aug_per_wrong
                assert m["n_parents"] == len(set(parents)) and m["n_wrong"] == len(wrong)
                if arm == "all":
                    assert sorted(set(parents)) == sorted(seed_ids)
                elif arm == "random":
                    # the same budget as llm2llm's targeting: as many parents as llm2llm sent in this seed and
                    # iteration, whatever its own student gets wrong
                    sent = metrics(out / f"llm2llm-seed{seed}")[m["iteration"]]["n_parents"]
                    assert len(set(parents)) == sent
                    random_differs_somewhere |= sorted(set(parents)) != wrong
                    random_budget_differs |= len(wrong) != sent
                else:
                    assert sorted(set(parents)) == wrong
                targeted_somewhere |= 0 < len(wrong) < len(seed_ids)
    # the checks above told the arms apart: some seeds right and some wrong, and a random draw that missed
    # and random's own student got another number wrong somewhere, where the old rule would have asked for that
    assert targeted_somewhere and random_differs_somewhere and random_budget_differs
    # over HTTP the teacher was only ever shown seed examples, never an augmented one
    assert comparison["sent"] and set(comparison["sent"]) <= seed_texts


def test_random_parents_are_a_seeded_uniform_draw_of_as_many_as_are_wrong():
    seed_rows = [{"id": f"s{k}"} for k in range(10)]
    wrong = seed_rows[2:6]
    cfg = Config(seed=3, augment="random")
    draw = llm2llm.choose_parents(cfg, seed_rows, wrong, 1)
    assert len(draw) == len(wrong) and draw == [row for row in seed_rows if row in draw]  # a subset, in seed order
    assert draw == llm2llm.choose_parents(Config(seed=3, augment="random"), seed_rows, wrong, 1)
    counts = {row["id"]: 0 for row in seed_rows}
    n = 2000
    draws = [llm2llm.choose_parents(cfg, seed_rows, wrong, i) for i in range(n)]
    for d in draws:
        for row in d:
            counts[row["id"]] += 1
    sigma = math.sqrt(n * 0.4 * 0.6)  # each seed is in a draw of 4 of 10 with probability 0.4
    assert all(abs(c - 0.4 * n) < 5 * sigma for c in counts.values()), counts
    assert len({tuple(r["id"] for r in d) for d in draws}) > 150  # iterations draw differently (210 subsets)
    assert llm2llm.choose_parents(Config(augment="all"), seed_rows, wrong, 1) == seed_rows
    assert llm2llm.choose_parents(Config(), seed_rows, wrong, 1) == wrong


def test_the_student_answer_is_shown_only_for_the_seeds_it_got_wrong():
    class RecordingTeacher:  # no reply at all: augment asks once per parent and gives up
        budget_exhausted, jobs = False, []

        def chat_many(self, jobs):
            self.jobs += jobs
            return [{"choices": [], "prompt_tokens": 0, "completion_tokens": 0, "cache_key": "k", "error": None}
                    for _ in jobs]

    task = get_task("sst2")
    rows = [{"id": "right", "text": "a smart and funny comedy", "label": "positive"},
            {"id": "wrong", "text": "it is a triumph", "label": "positive"}]
    predictions = {"right": {"answer": "positive", "correct": True}, "wrong": {"answer": "negative", "correct": False}}
    teacher = RecordingTeacher()
    cfg = Config(augment="all", show_student_answer=True, teacher_max_asks=1)
    llm2llm.augment(task, teacher, rows, predictions, rows, [], 0, cfg)
    assert [job["messages"][-1]["content"].count('answered "negative"') for job in teacher.jobs] == [0, 1]


def test_finetune_matched_takes_as_many_steps_as_the_final_llm2llm_student(comparison):
    out = comparison["out"]
    for seed in SEEDS:
        reference = out / f"llm2llm-seed{seed}"
        final = metrics(reference)[-1]["iteration"]
        matched = out / f"finetune-matched-seed{seed}"
        assert [m["iteration"] for m in metrics(matched)] == [0]
        assert steps(matched, 0) == steps(reference, final)
        assert steps(matched, 0) > steps(out / f"finetune-seed{seed}", 0)  # more data, more steps: not vacuous
        config = json.loads((matched / "config.json").read_text())
        assert config["train_steps"] == steps(reference, final) and config["iterations"] == 0


def test_train_steps_cycles_the_usual_plan(tiny_llama_dir):
    pairs = [(f"Review: {t}", label) for t, label in TEST]  # 6 rows, batch 4: 2 steps per epoch

    def run(**kwargs):
        model, tokenizer = load_pretrained(tiny_llama_dir)
        torch.manual_seed(0)
        add_lora(model, r=4, alpha=8, dropout=0.0)
        return train(model, tokenizer, pairs, lr=1e-3, batch_size=4, seed=5, progress=False, **kwargs)

    by_epochs = run(epochs=3)
    assert by_epochs["steps"] == 6
    assert run(epochs=1, max_steps=6)["loss_history"] == by_epochs["loss_history"]  # the same plan, step by step
    five = run(epochs=1, max_steps=5)
    assert five["steps"] == 5 and len(five["loss_history"]) == 5


def test_oneshot_asks_once_for_the_llm2llm_budget(comparison):
    out = comparison["out"]
    for seed in SEEDS:
        reference = metrics(out / f"llm2llm-seed{seed}")
        accepted = sum(m["n_augmented"] for m in reference)
        per_wrong = math.ceil(accepted / reference[0]["n_wrong"])
        run = out / f"oneshot-seed{seed}"
        config = json.loads((run / "config.json").read_text())
        assert config["iterations"] == 1 and config["aug_per_wrong"] == per_wrong and per_wrong > 1
        rows = metrics(run)
        assert len(rows) == 2 and rows[0]["n_augmented"] == rows[0]["n_wrong"] * per_wrong >= accepted


def test_the_shared_teacher_cache_never_pays_twice(comparison):
    out = comparison["out"]
    # every request that reached the teacher wrote one cache entry: none was paid twice
    assert len(list((out / "teacher_cache").rglob("*.json"))) == len(comparison["requests"])
    assert not list(out.glob("*/teacher_cache"))  # the runs share the comparison's cache
    # replies the runs used (cached or not) outnumber the requests paid: arms asking the same thing shared them,
    # e.g. the continue arm's first round is exactly llm2llm's
    used = sum(m["teacher_requests"] for run in out.glob("*-seed*") for m in metrics(run))
    assert used > len(comparison["requests"])


# -----------------------------------------------------------------------------
# The summary

def test_compare_json_holds_the_runs_numbers(comparison):
    out = comparison["out"]
    summary = json.loads((out / "compare.json").read_text())
    arms = ALL_ARMS.split(",")
    assert summary["arms"] == ["llm2llm"] + [a for a in arms if a != "llm2llm"]
    assert summary["seeds"] == list(SEEDS)
    for arm in arms:
        r = summary["results"][arm]
        runs = [metrics(out / f"{arm}-seed{s}") for s in SEEDS]
        finals = [m[-1]["test_acc"] for m in runs]
        assert r["test_acc"] == finals
        mean = sum(finals) / 2
        half = 12.706 * abs(finals[0] - finals[1]) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(2)
        assert r["mean"] == pytest.approx(mean)
        assert r["ci"] == pytest.approx([mean - half, mean + half], abs=1e-4)
        assert r["teacher_accepted"] == [sum(m["n_augmented"] for m in ms) for ms in runs]
        assert r["teacher_tokens"] == [sum(m["teacher_prompt_tokens"] + m["teacher_completion_tokens"] for m in ms)
                                       for ms in runs]
        assert r["final_train_steps"] == [steps(out / f"{arm}-seed{s}", ms[-1]["iteration"])
                                          for s, ms in zip(SEEDS, runs)]
        assert len(r["curve"]["mean"]) == (1 if arm.startswith("finetune") else 2 if arm == "oneshot" else 3)
        assert len(summary["seconds"][arm]) == 2
    assert summary["results"]["all"]["teacher_accepted"][0] > summary["results"]["llm2llm"]["teacher_accepted"][0]
    assert set(summary["paired"]) == set(arms) - {"llm2llm"}
    for arm, p in summary["paired"].items():
        # the pooled accuracies are the per-seed accuracies averaged (every seed has the same test items)
        assert p["a_acc"] == pytest.approx(summary["results"]["llm2llm"]["mean"])
        assert p["b_acc"] == pytest.approx(summary["results"][arm]["mean"])
        assert p["n_items"] == len(TEST) and p["seeds"] == list(SEEDS) and 0 < p["p"] <= 1
    text = (out / "compare.md").read_text()
    assert "t-interval" in text and "paired bootstrap" in text and "| random |" in text
    svg = xml.dom.minidom.parse(str(out / "compare.svg"))
    assert len([p for p in svg.getElementsByTagName("polyline") if p.getAttribute("class") == "mean"]) == len(arms)


def test_statistics_match_a_hand_computation():
    # two-sided 95% Student t quantiles, from the published table
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 19: 2.093, 29: 2.045,
             30: 2.042}
    for df, t in table.items():
        assert compare.t_quantile(0.95, df) == pytest.approx(t, abs=6e-4)
    mean, ci = compare.mean_interval([0.5, 0.6, 0.7])  # sd 0.1, t(0.975, 2) = 4.303
    assert mean == pytest.approx(0.6) and ci == pytest.approx([0.6 - 0.24843, 0.6 + 0.24843], abs=1e-4)
    assert compare.mean_interval([0.4]) == (0.4, None)

    # 2 seeds x 3 items; per item the differences summed over seeds are x: 2, y: 0, z: 1, observed sum 3 of 6.
    # Resampling 3 items from {2, 0, 1}: 27 equally likely draws; |sum* - 3| >= 3 only for (y,y,y) and (x,x,x), so
    # the exact two-sided p is 2/27. (Resampling the 6 seed x item pairs instead would give 2/64.)
    a = {0: {"x": True, "y": True, "z": False}, 1: {"x": True, "y": False, "z": True}}
    b = {0: {"x": False, "y": True, "z": False}, 1: {"x": False, "y": False, "z": False}}
    result = compare.paired_bootstrap(a, b, resamples=20000, seed=7)
    assert result["diff"] == pytest.approx(0.5) and result["n_items"] == 3 and result["n_seeds"] == 2
    assert result["a_acc"] == pytest.approx(4 / 6) and result["b_acc"] == pytest.approx(1 / 6)
    assert result["p"] == pytest.approx(2 / 27, abs=0.01)
    assert result["ci"] == [0.0, 1.0]  # sums 0 and 6 each have probability 1/27 > 2.5%
    assert compare.paired_bootstrap(a, b, resamples=20000, seed=7) == result  # seeded: reproducible
    same = compare.paired_bootstrap(a, a, resamples=100, seed=0)
    assert same["diff"] == 0 and same["p"] == 1


# -----------------------------------------------------------------------------
# Resuming, and bad input

def test_an_interrupted_comparison_resumes_to_the_same_compare_json(comparison, tiny_llama_dir, data_dir, teacher,
                                                                    tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    real_train, calls = llm2llm.train, []

    def interrupted_train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # the 8th fine-tune: seed 0's first runs are finished, one is half done
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(llm2llm, "train", interrupted_train)
    assert compare.main(compare_argv(tiny_llama_dir, data_dir, out, teacher.url)) == 130
    assert f"the comparison so far is kept in {out}; rerun the same command" in capsys.readouterr().err
    finished = [p.parent.name for p in out.glob("*/report.md")]
    assert finished and len(finished) < 14 and not (out / "compare.json").exists()
    monkeypatch.setattr(llm2llm, "train", real_train)

    assert compare.main(compare_argv(tiny_llama_dir, data_dir, out, teacher.url)) == 0
    resumed = json.loads((out / "compare.json").read_text())
    reference = json.loads((comparison["out"] / "compare.json").read_text())
    assert without_seconds(resumed) == without_seconds(reference)
    # once finished, the same command only reads the runs back: no model is trained again
    monkeypatch.setattr(llm2llm, "load_model", lambda *a, **k: pytest.fail("a finished run was loaded again"))
    monkeypatch.setattr(dist, "load_model", lambda *a, **k: pytest.fail("a finished run was loaded again"))
    assert compare.main(compare_argv(tiny_llama_dir, data_dir, out, teacher.url)) == 0
    assert without_seconds(json.loads((out / "compare.json").read_text())) == without_seconds(reference)


def test_the_first_student_is_trained_once_per_seed_and_shared(tiny_llama_dir, data_dir, teacher, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "cmp"
    real_train, calls = llm2llm.train, []
    monkeypatch.setattr(llm2llm, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    argv = compare_argv(tiny_llama_dir, data_dir, out, teacher.url, arms="finetune,llm2llm,random")
    argv[argv.index("--seeds") + 1] = "0"
    assert compare.main(argv) == 0
    llm2llm_trains = len(metrics(out / "llm2llm-seed0"))
    random_trains = len(metrics(out / "random-seed0")) - 1  # its iteration 0 is llm2llm's
    assert len(calls) == llm2llm_trains + random_trains  # finetune trains nothing of its own
    for arm in ("finetune", "random"):
        for name in ("adapter/adapter_model.safetensors", "train_stats.json", "test_predictions.jsonl"):
            assert (out / f"{arm}-seed0" / "iter_00" / name).read_bytes() == \
                (out / "llm2llm-seed0" / "iter_00" / name).read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--augment", "all"], "--augment: set by each arm"),
    (["--seed", "3"], "--seed: set by each arm"),
    (["--arms", "llm2llm,bogus"], "unknown arm(s) bogus"),
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--test-limit", "0"], "no test set"),
])
def test_bad_compare_flags_say_what_to_do(extra, message, tmp_path, capsys):
    code = compare.main(["--task", "sst2", "--out", str(tmp_path / "cmp"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
