"""Teacher cost: FLOPs and dollars per iteration, FLOPs and dollar budgets across a kill and resume, and
`llm2llm.py compare-teachers` with its compute-matching rule.

    python -m pytest -q tests/test_cost.py

A tiny random student and the scripted teacher of test_llm2llm.py behind real HTTP: every reply it sends reports
100 prompt and 12 completion tokens, so every cost below is a hand computation from the number of replies.
"""
import json
import re

import pytest

import compare_teachers
import dist
import llm2llm
from config import Config, RunError
from cost import count_parameters
from test_compare import ScriptedTeacher as CountingScriptedTeacher
from test_llm2llm import REPLY_TOKENS, assert_budget_stop_survives_kills, data_dir, flags, read_jsonl, run_error, \
    teacher  # noqa: F401 (data_dir and teacher are fixtures)

PROMPT, COMPLETION = REPLY_TOKENS - 12, 12  # what the scripted teacher reports for every reply
PARAMS = 1e6
PRICE_IN, PRICE_OUT = 0.5, 2.0  # USD per million tokens: a reply costs (100 * 0.5 + 12 * 2) / 1e6 = 74e-6
REPLY_USD = (PROMPT * PRICE_IN + COMPLETION * PRICE_OUT) / 1e6
REPLY_FLOPS = 2 * PARAMS * (PROMPT + COMPLETION)
COST_FLAGS = ["--teacher-params", str(PARAMS), "--teacher-price-in", str(PRICE_IN), "--teacher-price-out",
              str(PRICE_OUT)]


class CountingTeacher(CountingScriptedTeacher):
    """test_compare.py's teacher, which writes as many examples as the message asks for, and what it was asked."""

    @property
    def asked(self):
        return [re.search(r"Write (?:exactly )?(\d+) new", r["messages"][-1]["content"]).group(1)
                for r in self.requests]

    @property
    def parents(self):
        return self.seed_texts_sent()


# -----------------------------------------------------------------------------
# FLOPs and dollars per iteration

def test_flops_and_dollars_per_iteration_are_computed_from_the_tokens(tiny_llama_dir, data_dir, teacher, tmp_path):
    out = tmp_path / "run"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, out, teacher.url, *COST_FLAGS)) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert sum(m["teacher_requests"] for m in metrics) == len(teacher.requests) > 0
    for m in metrics:
        assert (m["teacher_prompt_tokens"], m["teacher_completion_tokens"]) == (PROMPT * m["teacher_requests"],
                                                                              COMPLETION * m["teacher_requests"])
        assert m["teacher_flops"] == pytest.approx(REPLY_FLOPS * m["teacher_requests"], rel=1e-12)
        assert m["teacher_cost_usd"] == pytest.approx(REPLY_USD * m["teacher_requests"], rel=1e-12)
    config = json.loads((out / "config.json").read_text())
    assert (config["teacher_params"], config["teacher_price_in"], config["teacher_price_out"]) == \
        (PARAMS, PRICE_IN, PRICE_OUT)
    report = (out / "report.md").read_text()
    assert "| teacher FLOPs | teacher USD |" in report
    assert f"{REPLY_USD * metrics[0]['teacher_requests']:.4f}" in report

    # an endpoint without --teacher-params or prices: neither is reported, and the report has no such column
    bare = tmp_path / "bare"
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, bare, teacher.url, "--iterations", "1")) == 0
    for m in read_jsonl(bare / "metrics.jsonl"):
        assert m["teacher_flops"] is None and m["teacher_cost_usd"] is None
    assert "teacher FLOPs" not in (bare / "report.md").read_text()


def test_the_embedded_teacher_is_counted_from_its_config(tiny_llama_dir, tiny_gpt2_dir, data_dir, tmp_path,
                                                         monkeypatch):
    from conftest import load_pretrained
    for folder in (tiny_llama_dir, tiny_gpt2_dir):  # untied and tied (GPT-2 shares its embedding with lm_head)
        model, _ = load_pretrained(folder)
        assert count_parameters(str(folder)) == sum(p.numel() for p in model.parameters())
    teacher_dir = tiny_llama_dir  # served by the embedded server
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    argv = flags(tiny_llama_dir, data_dir, tmp_path / "run", "unused", "--iterations", "1", "--teacher-max-tokens", "8")
    argv = argv[:argv.index("--teacher-url")] + argv[argv.index("--teacher-url") + 2:]  # the embedded server
    argv[argv.index("scripted")] = str(teacher_dir)
    assert llm2llm.main(argv) == 0
    params = sum(p.numel() for p in load_pretrained(teacher_dir)[0].parameters())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["teacher_params"] == params
    m = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert m["teacher_requests"] > 0 and m["teacher_flops"] == 2 * params * (m["teacher_prompt_tokens"] +
                                                                             m["teacher_completion_tokens"])
    # a run started before the teacher's size was recorded resumes: the size is derived, not a changed flag
    config_path = tmp_path / "run" / "config.json"
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items()
                                       if k != "teacher_params"}))
    assert llm2llm.main(argv) == 0
    assert json.loads(config_path.read_text())["teacher_params"] == params


# -----------------------------------------------------------------------------
# Budgets: they stop where the hand computation says, count cached replies, and resume from metrics.jsonl

@pytest.mark.parametrize("budget, stop", [
    (["--teacher-budget-flops", str(2 * REPLY_FLOPS)], "teacher FLOPs budget of 4.48e+08 spent"),  # two replies
    (["--teacher-budget-usd", str(1.5 * REPLY_USD)], "teacher budget of $0.000111 spent"),  # spent by the 2nd
])
def test_a_flops_or_dollar_budget_stops_after_two_replies_and_resumes_there(budget, stop, tiny_llama_dir, data_dir,
                                                                             teacher, tmp_path):
    argv = lambda out: flags(tiny_llama_dir, data_dir, out, teacher.url, "--iterations", "3",  # noqa: E731
                             *COST_FLAGS, *budget)
    reference = tmp_path / "reference"
    assert llm2llm.main(argv(reference)) == 0
    metrics = read_jsonl(reference / "metrics.jsonl")
    assert metrics[0]["n_wrong"] > 2 and len(teacher.requests) == 2  # the budget, not the wrong seeds, stopped it
    assert metrics[0]["stopped"] == stop and metrics[0]["n_augmented"] > 0
    assert metrics[0]["teacher_flops"] == pytest.approx(2 * REPLY_FLOPS)
    assert metrics[0]["teacher_cost_usd"] == pytest.approx(2 * REPLY_USD)
    # what was paid for is trained on, then the run stops
    assert [m["iteration"] for m in metrics] == [0, 1] and metrics[1]["teacher_requests"] == 0
    assert metrics[1]["train_size"] == 6 + metrics[0]["n_augmented"]
    assert_budget_stop_survives_kills(argv, teacher, metrics, tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--teacher-budget-flops", "1e12"], "--teacher-budget-flops needs the teacher's parameter count"),
    (["--teacher-budget-usd", "1"], "--teacher-budget-usd needs the teacher's prices"),
    (["--teacher-price-in", "1"], "give both --teacher-price-in and --teacher-price-out"),
    (["--teacher-params", "-5"], "--teacher-params must be positive, got -5"),
    (["--teacher-budget-usd", "-1", "--teacher-price-in", "1", "--teacher-price-out", "1"],
     "--teacher-budget-usd must be zero or more"),
])
def test_bad_cost_flags_say_what_to_do_before_anything_is_trained(extra, message, tiny_llama_dir, data_dir, teacher,
                                                                   tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(llm2llm, "train", lambda *a, **k: pytest.fail("trained before the flags were checked"))
    out = tmp_path / "run"
    err = run_error(capsys, flags(tiny_llama_dir, data_dir, out, teacher.url, *extra))
    assert message in err, err
    assert not out.exists()


# -----------------------------------------------------------------------------
# compare-teachers: the matching rule, and two scripted teachers end to end

def teacher_specs(**kw):
    return [dict({"label": x, "url": f"http://{x}/v1", "model": x, "params": None, "price_in": None,
                  "price_out": None}, **{k[:-2]: v for k, v in kw.items() if k.endswith("_" + x)}) for x in "ab"]


def test_the_matching_rule_gives_the_cheaper_teacher_more_samples():
    # Bansal et al.: Gemma2-9B against Gemma2-27B at equal compute samples 3x as many solutions
    a, b = teacher_specs(params_a=9e9, params_b=27e9)
    assert compare_teachers.matched_samples([a, b], 4) == ("params", pytest.approx(3.0))
    assert (a["k"], b["k"]) == (12, 4)
    a, b = teacher_specs(params_a=5e9, params_b=2e9)  # B is the cheap one; 2.5 x 1 rounds half up
    compare_teachers.matched_samples([a, b], 1)
    assert (a["k"], b["k"]) == (1, 3)
    a, b = teacher_specs(params_a=7e9, params_b=8e9)  # 8/7 * 1 = 1.14: the cheaper teacher still gets 1
    compare_teachers.matched_samples([a, b], 1)
    assert (a["k"], b["k"]) == (1, 1)
    # by price: a sample's price is price-in + price-out
    a, b = teacher_specs(price_in_a=0.1, price_out_a=0.3, price_in_b=1.0, price_out_b=3.0)
    assert compare_teachers.matched_samples([a, b], 2) == ("price", pytest.approx(10.0))
    assert (a["k"], b["k"]) == (20, 2)
    a, b = teacher_specs(params_a=1e9, params_b=2e9, price_in_a=1.0, price_out_a=1.0, price_in_b=1.0,
                         price_out_b=1.0)
    compare_teachers.matched_samples([a, b], 3, "price")  # the same price: the same k, whatever the sizes
    assert (a["k"], b["k"]) == (3, 3)
    with pytest.raises(RunError, match="needs both teachers' sizes"):
        compare_teachers.matched_samples(teacher_specs(params_a=1e9), 1, "params")
    with pytest.raises(RunError, match="sizes .* or both teachers' prices"):
        compare_teachers.matched_samples(teacher_specs(params_a=1e9), 1)


def test_compare_teachers_runs_both_teachers_at_matched_k_and_reports_side_by_side(tiny_llama_dir, data_dir,
                                                                                  tmp_path, capsys, monkeypatch):
    # two endpoints whose teachers write as many examples as asked; A is a third of B's size, so it writes 3 x 2
    cheap, strong = CountingTeacher(), CountingTeacher()
    out = tmp_path / "teachers"
    argv = flags(tiny_llama_dir, data_dir, out, "unused", "--iterations", "1", "--aug-per-wrong", "2")
    argv = argv[:argv.index("--teacher-url")] + argv[argv.index("--teacher-model") + 2:]
    argv = argv + [
        "--teacher-a", cheap.url, "--model-a", "scripted", "--params-a", "1e6", "--price-in-a", "0.5",
        "--price-out-a", "2", "--teacher-b", strong.url, "--model-b", "scripted", "--params-b", "3e6",
        "--label-a", "small", "--label-b", "large", "--seeds", "0,1", "--bootstrap-resamples", "500"]
    try:
        assert compare_teachers.main(argv) == 0
    finally:
        cheap.server.shutdown()
        strong.server.shutdown()
    printed = capsys.readouterr().out
    assert "S_WC = (P_SE / P_WC) * S_SE" in printed and "small k = 6, large k = 2" in printed
    assert {int(n) for n in cheap.asked} == {6} and {int(n) for n in strong.asked} == {2}
    summary = json.loads((out / "compare_teachers.json").read_text())
    assert summary["teachers"]["small"]["k"] == 6 and summary["teachers"]["large"]["k"] == 2
    for label, params, usd in (("small", 1e6, (0.5, 2.0)), ("large", 3e6, None)):
        r = summary["results"][label]
        runs = [read_jsonl(out / f"{label}-seed{s}" / "metrics.jsonl") for s in (0, 1)]
        assert [json.loads((out / f"{label}-seed{s}" / "config.json").read_text())["aug_per_wrong"]
                for s in (0, 1)] == [summary["teachers"][label]["k"]] * 2
        tokens = [sum(m["teacher_prompt_tokens"] + m["teacher_completion_tokens"] for m in ms) for ms in runs]
        assert r["teacher_tokens"] == tokens and min(tokens) > 0
        assert r["teacher_flops"] == pytest.approx([2 * params * t for t in tokens])
        if usd:
            assert r["teacher_cost_usd"] == pytest.approx([sum(m["teacher_prompt_tokens"] * usd[0] +
                                                               m["teacher_completion_tokens"] * usd[1] for m in ms)
                                                           / 1e6 for ms in runs])
        else:
            assert r["teacher_cost_usd"] == [None, None]
        assert r["test_acc"] == [ms[-1]["test_acc"] for ms in runs]
        assert r["coverage_at_k"] == [None, None]  # questions mode samples no solutions
    # the first student is shared: both teachers were asked about the same wrong seeds in the first round
    for s in (0, 1):
        assert (out / f"large-seed{s}" / "iter_00" / "adapter" / "adapter_model.safetensors").read_bytes() == \
            (out / f"small-seed{s}" / "iter_00" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert sorted(cheap.parents) == sorted(strong.parents)
    assert summary["paired"]["seeds"] == [0, 1] and 0 < summary["paired"]["p"] <= 1
    text = (out / "compare_teachers.md").read_text()
    assert "| small | scripted | 1e+06 | 6 | 2 |" in text and "| large | scripted | 3e+06 | 2 | 2 |" in text
    assert "n/a" in text and "S\\_WC" in text
    assert (out / "compare_teachers.svg").exists()

    # the same command again only reads the finished runs back: no model is loaded
    before = (out / "compare_teachers.json").read_text()
    monkeypatch.setattr(llm2llm, "load_model", lambda *a, **k: pytest.fail("a finished run was loaded again"))
    monkeypatch.setattr(dist, "load_model", lambda *a, **k: pytest.fail("a finished run was loaded again"))
    assert compare_teachers.main(argv) == 0
    assert json.loads((out / "compare_teachers.json").read_text())["results"] == json.loads(before)["results"]


@pytest.mark.parametrize("extra, message", [
    (["--teacher-a", "http://127.0.0.1:9/v1", "--teacher-b", "http://127.0.0.1:9/v1", "--model-b", "m"],
     "--teacher-a is a URL: name the model it serves with --model-a"),
    (["--teacher-a", "http://127.0.0.1:9/v1", "--model-a", "m", "--teacher-b", "http://127.0.0.1:9/v1",
      "--model-b", "n"], "needs both teachers' sizes"),
    (["--teacher-a", "x", "--teacher-b", "y", "--teacher-url", "http://z/v1"], "--teacher-url: set for each teacher"),
    (["--teacher-a", "x", "--teacher-b", "y", "--label-a", "t", "--label-b", "t"], "both 't'"),
    (["--teacher-a", "x", "--teacher-b", "y", "--iterations", "0"], "nothing to compare"),
    (["--teacher-a", "x", "--model-a", "z", "--teacher-b", "y"], "--model-a names the model at a URL"),
])
def test_bad_compare_teachers_flags_say_what_to_do(extra, message, tmp_path, capsys):
    code = compare_teachers.main(["--task", "sst2", "--out", str(tmp_path / "cmp"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_solution_metrics_in_the_runs_reach_the_side_by_side_table(tmp_path):
    # two finished runs per teacher written by hand, as a run that sampled solutions leaves them: the first round's
    # coverage@k, diversity@k and FPR (with a judge's for one teacher) are read from metrics.jsonl
    first = {"a": [(0.5, 2.0, 0.1, None), (0.7, 3.0, 0.2, None)], "b": [(0.4, 1.0, 0.0, 0.05), (0.6, 1.5, 0.1, 0.15)]}
    results = {}
    for label, values in first.items():
        for seed, (coverage, diversity, fpr, judge) in enumerate(values):
            run = tmp_path / f"{label}-seed{seed}"
            rows = [dict(iteration=0, n_augmented=3, teacher_prompt_tokens=100, teacher_completion_tokens=20,
                         teacher_flops=240.0, teacher_cost_usd=None, test_acc=0.25, coverage_at_k=coverage,
                         diversity_at_k=diversity, fpr_estimate=fpr, **({"fpr_judge": judge} if judge else {})),
                    dict(iteration=1, n_augmented=0, teacher_prompt_tokens=0, teacher_completion_tokens=0,
                         teacher_flops=0.0, teacher_cost_usd=None, test_acc=0.5 + seed / 4)]
            for m in rows:
                (run / f"iter_{m['iteration']:02d}").mkdir(parents=True)
                (run / f"iter_{m['iteration']:02d}" / "train_stats.json").write_text(json.dumps({"steps": 4}))
            (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))
            (run / "iter_01" / "test_predictions.jsonl").write_text("".join(
                json.dumps({"id": f"t{i}", "correct": i < 2 + seed}) + "\n" for i in range(4)))
            results[label, seed] = compare_teachers.load_result(run)
    specs = teacher_specs(params_a=1e9, params_b=3e9)
    compare_teachers.matched_samples(specs, 2)
    args = type("Args", (), {"bootstrap_resamples": 200, "bootstrap_seed": 0})
    summary = compare_teachers.summarize(results, specs, [0, 1], Config(), args, "params", 3.0)
    assert summary["results"]["a"]["coverage_at_k"] == [0.5, 0.7]
    assert summary["results"]["b"]["fpr_judge"] == [0.05, 0.15] and summary["results"]["a"]["fpr_judge"] == [None] * 2
    assert summary["results"]["a"]["teacher_flops"] == [240.0, 240.0]
    assert summary["results"]["a"]["mean"] == pytest.approx(0.625)
    rows = {line.split()[0]: line for line in compare_teachers.render_table(summary).splitlines()[2:4]}
    assert re.search(r"60\.0%\s+2\.50\s+15\.0%\s", rows["a"]) and re.search(r"50\.0%\s+1\.25\s+5\.0% \(judge 10\.0%\)",
                                                                           rows["b"]), rows
    assert rows["a"].rstrip().endswith("n/a")  # no prices: no dollars


def test_an_embedded_teacher_is_matched_by_its_counted_size(tiny_llama_dir, tiny_gpt2_dir, tmp_path, capsys,
                                                            monkeypatch):
    from conftest import load_pretrained
    a, b = teacher_specs()
    a.update(url=None, model=str(tiny_llama_dir))
    b.update(url=None, model=str(tiny_gpt2_dir))
    sizes = [sum(p.numel() for p in load_pretrained(d)[0].parameters()) for d in (tiny_llama_dir, tiny_gpt2_dir)]
    assert sizes[0] < sizes[1]
    assert compare_teachers.matched_samples([a, b], 2) == ("params", pytest.approx(sizes[1] / sizes[0]))
    assert (a["params"], b["params"]) == tuple(sizes) and (a["k"], b["k"]) == (round(2 * sizes[1] / sizes[0]), 2)
    # a model spec means the embedded server: a base URL in the environment would silently take its place
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert compare_teachers.main(["--task", "sst2", "--out", str(tmp_path / "cmp"), "--teacher-a",
                         str(tiny_llama_dir), "--teacher-b", str(tiny_gpt2_dir)]) == 2
    assert "$OPENAI_BASE_URL is set" in capsys.readouterr().err
