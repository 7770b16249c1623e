"""Solution sampling (--teacher-mode solutions/both), its metrics, the judge, --verify, and k choices from any server.

    python -m pytest -q tests/test_solutions.py

A scripted teacher behind real HTTP solves three GSM8K problems with solutions that are right, wrong, or right in
their answer with a wrong calculator note, in known proportions; coverage@k, diversity@k and the false-positive
estimates in metrics.jsonl must equal the values worked out by hand below. The tiny random student gets every seed
problem wrong (asserted), so all three are sent.
"""
import json
import re
import threading
from http.server import ThreadingHTTPServer

import pytest

import llm2llm
import solutions
import tasks
import teacher as T
from conftest import ScriptedHandler
from test_llm2llm import run_error

Q1 = "Tom has 4 boxes with 250 pens in each box. How many pens does he have?"
Q2 = "A shop sells 6 apples for $3. How much do 10 apples cost?"
Q3 = "Sara reads 12 pages a day for 3 days. How many pages does she read?"
SEED = [{"question": Q1, "answer": "He has 4*250 = <<4*250=1000>>1000 pens.\n#### 1000"},
        {"question": Q2, "answer": "One apple costs 3/6 = <<3/6=0.5>>0.5 dollars.\nTen cost 10*0.5 = <<10*0.5=5>>5.\n"
                                   "#### 5"},
        {"question": Q3, "answer": "She reads 12*3 = <<12*3=36>>36 pages.\n#### 36"}]
TEST = [{"question": "Ann has 3 cats and gets 2 more. How many cats does she have?",
         "answer": "She has 3+2 = <<3+2=5>>5 cats.\n#### 5"}]

# k = 4 solutions per problem, in the order the server hands them out
BAD_NOTE = "Tom has 4*250 = <<4*250=900>>1000 pens.\n#### 1000"   # right answer, wrong working
SOLUTIONS = {
    Q1: ["Tom has 4*250 = <<4*250=1000>>1,000 pens.\n#### 1,000",   # right
         "Tom has  4*250 = <<4*250=1000>>1000 pens.\n####   1000",   # the same solution, formatted differently
         BAD_NOTE,
         "Tom has 4+250 = <<4+250=254>>254 pens.\n#### 254"],        # wrong
    Q2: ["10 apples cost 10*3 = <<10*3=30>>30.\n#### 30", "#### 6", "Each is 6/3 = <<6/3=2>>2.\n#### 2",
         "The cost is 5 dollars."],                                  # no '####' line: wrong by the strict rule
    Q3: ["12 pages times 3 days is 12*3 = <<12*3=36>>36 pages.\n#### 36",
         "Each day 12, so 12+12+12 = <<12+12+12=36>>36.\n#### 36",
         "#### 36",                                                  # right answer, no working
         "Solution: She reads 12*3 = <<12*3=36>>36 pages.\n#### 36"],  # the seed's own solution: a duplicate
}
# by hand: answer-correct Q1 3 (2 distinct), Q2 0, Q3 4 (4 distinct) -> coverage 2/3, diversity (2+0+4)/3 = 2,
# calculator-note failures 1 of 7; kept: Q1's first, Q3's first two
COVERAGE, DIVERSITY, FPR = 2 / 3, 2.0, 1 / 7
REJECTED = {"solution_wrong_answer": 5, "solution_duplicate": 2, "solution_bad_calculation": 1,
            "solution_no_working": 1}
# the judge: the wrong note is unsound, one verdict is unparseable, the other 5 are sound -> fpr_judge 1/6
JUDGE_UNSOUND, JUDGE_UNPARSEABLE = "<<4*250=900>>", "12+12+12"

# --verify 3: the new problem written from each seed, and the teacher's three solutions of it
NEW = {Q1: ("Lily buys 7 bags with 20 marbles in each bag. How many marbles does she buy?",
            "She buys 7*20 = <<7*20=140>>140 marbles.\n#### 140", ["#### 140", "7*20 = 140\n#### 140", "#### 150"]),
       Q2: ("A farmer plants 9 rows of 11 carrots. How many carrots does he plant?",
            "He plants 9*11 = <<9*11=99>>99 carrots.\n#### 99", ["#### 99", "#### 98", "#### 97"]),
       Q3: ("Ben runs 5 miles a day for 6 days. How far does he run in all?",
            "He runs 5*6 = <<5*6=30>>30 miles.\n#### 30", ["#### 30"] * 3)}


class ScriptedSolver:
    """Answers three kinds of chat request by their system message: write new problems, solve a problem (the next
    scripted solutions of that problem, n of them, or one if `ignores_n`, as llama.cpp's server does), judge."""

    def __init__(self, ignores_n=False):
        self.requests, self.ignores_n, self.lock = [], ignores_n, threading.Lock()
        self.queues = {q: list(s) for q, s in SOLUTIONS.items()}
        self.queues.update({new: list(solutions) for new, _, solutions in NEW.values()})
        solver = self

        class Handler(ScriptedHandler):

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with solver.lock:
                    solver.requests.append(request)
                    texts = solver.reply(request)
                self._send({"object": "chat.completion", "model": request["model"],
                            "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                                         "finish_reason": "stop"} for i, t in enumerate(texts)],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 5 * len(texts)}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, request):
        system, user = request["messages"][0]["content"], request["messages"][-1]["content"]
        if "You check worked solutions" in system:
            solution = user.split("Solution to check:\n", 1)[1]
            if JUDGE_UNSOUND in solution:
                return ["The note is wrong.\nVERDICT: UNSOUND"]
            if JUDGE_UNPARSEABLE in solution:
                return ["Looks fine to me, mostly."]
            return ["Every step checks out.\n**VERDICT: SOUND**"]
        if "worked solutions" in system:  # the solve prompt
            problem = re.findall(r"Problem: (.*)\nSolution:", user)[-1]
            n = 1 if self.ignores_n else request.get("n", 1)
            queue = self.queues[problem]
            taken, self.queues[problem] = queue[:n], queue[n:]
            return taken
        parent = re.findall(r"Question: (.*)", user)[-1]  # writing new problems
        question, answer, _ = NEW[parent]
        return [f"1. Question: {question}\nAnswer: {answer}"]

    def kinds(self):
        def kind(r):
            system = r["messages"][0]["content"]
            return "judge" if "You check" in system else "solve" if "worked solutions" in system else "write"
        return [kind(r) for r in self.requests]


@pytest.fixture
def solver():
    s = ScriptedSolver()
    yield s
    s.server.shutdown()


@pytest.fixture
def gsm8k_dir(tmp_path):
    folder = tmp_path / "data" / "gsm8k"
    folder.mkdir(parents=True)
    for name, rows in (("train", SEED), ("test", TEST)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "data"


def flags(student, data_dir, out, url, *extra):
    return ["--task", "gsm8k", "--data-dir", str(data_dir), "--student", str(student), "--teacher-url", url,
            "--teacher-model", "scripted", "--seed-size", "3", "--iterations", "1", "--epochs", "1", "--min-steps",
            "0", "--batch-size", "3", "--max-new-tokens", "4", "--teacher-workers", "1", "--out", str(out), *extra]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# -----------------------------------------------------------------------------
# The loop with --teacher-mode solutions

@pytest.mark.parametrize("ignores_n", [False, True])
def test_solutions_metrics_match_the_hand_computed_values(tiny_llama_dir, gsm8k_dir, tmp_path, ignores_n):
    solver = ScriptedSolver(ignores_n=ignores_n)
    try:
        out = tmp_path / "run"
        argv = flags(tiny_llama_dir, gsm8k_dir, out, solver.url, "--teacher-mode", "solutions",
                     "--samples-per-wrong", "4")
        assert llm2llm.main(argv) == 0
        first, last = read_jsonl(out / "metrics.jsonl")
        assert first["n_wrong"] == 3 and first["n_parents"] == 3
        assert first["k"] == 4 and first["n_solutions"] == 12 and first["n_answer_correct"] == 7
        assert first["coverage_at_k"] == pytest.approx(COVERAGE)
        assert first["diversity_at_k"] == pytest.approx(DIVERSITY)
        assert first["fpr_estimate"] == pytest.approx(FPR)
        assert first["rejected_by_reason"] == REJECTED and first["n_rejected"] == 9
        assert "fpr_judge" not in first and "k" not in last  # no judge; nothing sampled after the last iteration
        # k means k: a server that ignores n is asked again for the missing choices, one request per choice
        assert len(solver.requests) == (12 if ignores_n else 3)
        assert all(not queue for queue in list(solver.queues.values())[:3])

        added = read_jsonl(out / "iter_00" / "augmented.jsonl")
        assert [(a["question"], a["answer"]) for a in added] == [
            (Q1, SOLUTIONS[Q1][0]), (Q3, SOLUTIONS[Q3][0]), (Q3, SOLUTIONS[Q3][1])]
        seed_ids = [r["id"] for r in read_jsonl(out / "seed.jsonl")]
        assert [(a["provenance"]["parent_id"], a["provenance"]["mode"], a["provenance"]["sample"]) for a in added] == [
            (seed_ids[0], "solution", 0), (seed_ids[2], "solution", 0), (seed_ids[2], "solution", 1)]
        assert all(a["provenance"]["teacher_model"] == "scripted" for a in added)
        assert read_jsonl(out / "iter_01" / "train.jsonl")[3:] == added
        assert "coverage@k" in (out / "report.md").read_text()

        # resumed: everything is cached, nothing is asked again
        n = len(solver.requests)
        assert llm2llm.main(argv) == 0
        assert len(solver.requests) == n
    finally:
        solver.server.shutdown()


def test_the_judge_gives_fpr_judge(tiny_llama_dir, gsm8k_dir, solver, tmp_path):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, gsm8k_dir, out, solver.url, "--teacher-mode", "solutions",
                              "--judge-url", solver.url, "--judge-model", "judge")) == 0
    first = read_jsonl(out / "metrics.jsonl")[0]
    assert (first["judge_sound"], first["judge_unsound"], first["judge_unparseable"]) == (5, 1, 1)
    assert first["fpr_judge"] == pytest.approx(1 / 6)
    assert first["fpr_estimate"] == pytest.approx(FPR)
    assert solver.kinds().count("judge") == 7
    assert first["judge_prompt_tokens"] == 70 and first["judge_completion_tokens"] == 35
    assert any((out / "judge_cache").rglob("*.json"))


def test_a_judge_budget_stops_judging_and_holds_across_resume(tiny_llama_dir, gsm8k_dir, solver, tmp_path):
    # a judge reply costs 10 + 5 tokens and one worker asks in turn: a budget of 45 is spent by the third reply
    argv = flags(tiny_llama_dir, gsm8k_dir, tmp_path / "run", solver.url, "--teacher-mode", "solutions",
                 "--judge-url", solver.url, "--judge-model", "judge", "--judge-budget-tokens", "45")
    assert llm2llm.main(argv) == 0
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["judge_unjudged"] == 4 and solver.kinds().count("judge") == 3
    assert first["judge_sound"] + first["judge_unsound"] + first["judge_unparseable"] == 3
    assert (first["judge_prompt_tokens"], first["judge_completion_tokens"]) == (30, 15)

    # killed before the iteration's row was written: the cached judge replies count again, nothing more is asked
    (tmp_path / "run" / "metrics.jsonl").unlink()
    n = len(solver.requests)
    assert llm2llm.main(argv) == 0
    assert len(solver.requests) == n
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["judge_unjudged"] == 4


def test_both_modes_write_questions_and_solutions(tiny_llama_dir, gsm8k_dir, solver, tmp_path):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, gsm8k_dir, out, solver.url, "--teacher-mode", "both")) == 0
    added = read_jsonl(out / "iter_00" / "augmented.jsonl")
    modes = [a["provenance"]["mode"] for a in added]
    assert modes == ["question"] * 3 + ["solution"] * 3
    first = read_jsonl(out / "metrics.jsonl")[0]
    assert first["coverage_at_k"] == pytest.approx(COVERAGE) and first["n_augmented"] == 6


def test_verify_keeps_only_problems_the_teacher_solves_to_their_answer(tiny_llama_dir, gsm8k_dir, solver, tmp_path):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, gsm8k_dir, out, solver.url, "--verify", "3",
                              "--teacher-max-asks", "1")) == 0
    added = read_jsonl(out / "iter_00" / "augmented.jsonl")
    # Lily: 2 of 3 solutions reach 140 (kept); farmer: 1 of 3 reach 99 (rejected); Ben: 3 of 3 (kept)
    assert [a["question"] for a in added] == [NEW[Q1][0], NEW[Q3][0]]
    first = read_jsonl(out / "metrics.jsonl")[0]
    assert first["rejected_by_reason"] == {"failed_verification": 1} and "k" not in first
    rejected = read_jsonl(out / "iter_00" / "rejected.jsonl")
    assert NEW[Q2][0] in rejected[0]["text"] and rejected[0]["votes"] == "1/3"
    assert solver.kinds() == ["write"] * 3 + ["solve"] * 3


@pytest.mark.parametrize("task", ["sst2", "trec", "snips"])
def test_solutions_do_not_apply_to_classification_tasks(capsys, tmp_path, monkeypatch, task):
    trained = []
    monkeypatch.setattr(llm2llm, "train", lambda *a, **k: trained.append(1))
    err = run_error(capsys, ["--task", task, "--teacher-mode", "solutions", "--data-dir", str(tmp_path / "none"),
                             "--out", str(tmp_path / "run")])
    assert f"--teacher-mode solutions does not apply to task {task}" in err and "labels" in err
    assert trained == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, says", [
    (["--teacher-mode", "answers"], "--teacher-mode must be one of questions, solutions, both"),
    (["--teacher-mode", "solutions", "--samples-per-wrong", "0"], "--samples-per-wrong must be positive"),
    (["--teacher-mode", "solutions", "--verify", "3"], "writes none"),
    (["--teacher-mode", "solutions", "--judge-url", "http://127.0.0.1:9/v1"], "both --judge-url and --judge-model"),
    (["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j"], "use it with --teacher-mode solutions"),
])
def test_bad_mode_flags_are_refused_at_start(capsys, tmp_path, extra, says):
    err = run_error(capsys, ["--task", "gsm8k", "--data-dir", str(tmp_path / "none"), "--out",
                             str(tmp_path / "run"), *extra])
    assert says in err


# -----------------------------------------------------------------------------
# Pieces

def test_a_server_that_ignores_n_still_gives_k_distinct_seeded_samples(tmp_path):
    solver = ScriptedSolver(ignores_n=True)
    try:
        messages = tasks.get_task("gsm8k").solve_messages({"question": Q1})
        t = T.Teacher(solver.url, "scripted", cache_dir=str(tmp_path / "cache"), workers=2, seed=0)
        [result] = t.chat_many([{"messages": messages, "n": 4}], progress=False)
        assert [c["text"] for c in result["choices"]] == SOLUTIONS[Q1]
        assert result["prompt_tokens"] == 40 and result["completion_tokens"] == 20
        seeds = [r["seed"] for r in solver.requests]
        assert len(seeds) == len(set(seeds)) == 4
        assert [r.get("n", 1) for r in solver.requests] == [4, 3, 2, 1]
        # cached whole: asked again, no request
        again = T.Teacher(solver.url, "scripted", cache_dir=str(tmp_path / "cache"), workers=2, seed=0)
        assert again.chat_many([{"messages": messages, "n": 4}], progress=False)[0]["choices"] == result["choices"]
        assert len(solver.requests) == 4
    finally:
        solver.server.shutdown()


def test_solution_key_normalises_whitespace_and_number_formatting():
    assert tasks.solution_key("Pay $1,000  now\n####  3.50") == tasks.solution_key("Pay $1000 now #### 3.5")
    assert tasks.solution_key("#### 3.5") != tasks.solution_key("#### 35")
    assert tasks.solution_key("12 - 2 = 10") != tasks.solution_key("12 = 10")


def test_parse_and_check_solutions():
    gsm8k = tasks.get_task("gsm8k")
    row = SEED[2]
    assert gsm8k.parse_solution("**Solution:** 12*3 = 36\n#### 36\nThanks!") == ("12*3 = 36\n#### 36", None)
    assert gsm8k.parse_solution("12*3 = 36 and then", truncated=True)[1] == "truncated"
    assert gsm8k.parse_solution("12*3 = 36\n#### 3", truncated=True)[1] == "truncated"  # cut inside its answer
    assert gsm8k.parse_solution("12*3 = 36\n#### 36\nMore", truncated=True) == ("12*3 = 36\n#### 36", None)
    assert gsm8k.check_solution("12*3 = 36\n#### 36", row) is None
    assert gsm8k.check_solution("12*3 = 37\n#### 37", row) == "wrong_answer"
    assert gsm8k.check_solution("The answer is 36.", row) == "wrong_answer"  # strict: no '####'
    assert gsm8k.check_solution("#### 36", row) == "no_working"
    assert gsm8k.check_solution("12*3 = <<12*3=35>>36\n#### 36", row) == "bad_calculation"
    assert not tasks.get_task("sst2").supports_solutions() and gsm8k.supports_solutions()


def test_parse_verdict_is_strict():
    assert solutions.parse_verdict("Fine.\nVERDICT: SOUND") is True
    assert solutions.parse_verdict("bad step\n**Verdict:** UNSOUND.\n\n") is False
    assert solutions.parse_verdict("VERDICT: SOUND\nActually, wait.") is None
    assert solutions.parse_verdict("VERDICT: MOSTLY SOUND") is None
    assert solutions.parse_verdict("") is None


def test_a_users_own_number_and_exact_tasks_have_solutions(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"input": "What is 6 times 7?", "output": "42"}) + "\n")
    number = tasks.get_task(str(train), answer_type="number")
    row = number.load("train")[0]
    messages = number.solve_messages(row)
    assert "What is 6 times 7?" in messages[-1]["content"] and "42" not in messages[-1]["content"]
    assert number.supports_solutions()
    assert number.check_solution(number.parse_solution("6*7 = 42\n#### 42")[0], row) is None
    assert number.check_solution("42", row) is None
    assert number.check_solution("6*7 = 43\n#### 43", row) == "wrong_answer"
    exact = tasks.get_task(str(train), answer_type="exact")
    assert exact.check_solution(exact.parse_solution("Output: 42.")[0], row) is None
    assert exact.check_solution("forty-two", row) == "wrong_answer"
    assert not tasks.get_task(str(train), answer_type="label").supports_solutions()
