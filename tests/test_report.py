"""Tests for report.py on a hand-built run directory (no model, no network).

    python -m pytest -q tests/test_report.py

The fake run has 3 iterations and 6 seed examples whose right/wrong histories cover every case the report
distinguishes; the expected numbers below are worked out by hand from those histories, not by calling report.py.
"""

import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import report  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"

# seed id -> correct at iterations 0, 1, 2
HISTORY = {
    "gsm8k-train-0": [False, False, True],   # wrong -> right at 2
    "gsm8k-train-1": [False, True, True],    # wrong -> right at 1
    "gsm8k-train-2": [True, False, True],    # right, wrong, right again: right from 2
    "gsm8k-train-3": [True, True, False],    # right -> wrong
    "gsm8k-train-4": [True, False, False],   # right -> wrong
    "gsm8k-train-5": [False, False, False],  # never right
}
QUESTIONS = {
    "gsm8k-train-0": "Tom has 3 | 4 apples <b>and</b> &\nbuys 2 more. How many?",
    "gsm8k-train-1": "A train travels " + "very " * 30 + "far. How far?",
}
# accepted teacher rows per iteration: parent id -> how many (only wrong seeds of that iteration can be parents)
AUGMENTED = {
    0: {"gsm8k-train-0": 2, "gsm8k-train-1": 1, "gsm8k-train-5": 1},
    1: {"gsm8k-train-0": 1, "gsm8k-train-2": 2, "gsm8k-train-4": 1, "gsm8k-train-5": 1},
    2: {},
}
METRICS = [
    dict(iteration=0, train_size=6, n_seed=6, n_wrong=3, n_augmented=4, n_rejected=6,
         rejected_by_reason={"near_dup": 1, "dup": 3, "bad_math": 2}, seed_acc=0.5, test_acc=0.4567,
         teacher_prompt_tokens=1000, teacher_completion_tokens=234, teacher_requests=3, train_tokens=900,
         train_seconds=10.0, eval_seconds=2.5, teacher_seconds=30.0),
    dict(iteration=1, train_size=10, n_seed=6, n_wrong=4, n_augmented=5, n_rejected=0, rejected_by_reason={},
         seed_acc=0.3333333, test_acc=None, teacher_prompt_tokens=2000, teacher_completion_tokens=500,
         teacher_requests=4, train_tokens=1500, train_seconds=60.0, eval_seconds=30.0, teacher_seconds=35.0),
    dict(iteration=2, train_size=15, n_seed=6, n_wrong=3, n_augmented=0, n_rejected=0, rejected_by_reason={},
         seed_acc=0.5, test_acc=0.625, teacher_prompt_tokens=0, teacher_completion_tokens=0,
         teacher_requests=0, train_tokens=2200, train_seconds=3000.0, eval_seconds=500.0, teacher_seconds=0.0),
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "task": "gsm8k", "student": "SmolLM2-135M-Instruct", "teacher_model": "teacher-7b", "seed_size": 6,
        "iterations": 2, "api_key": "sk-do-not-print-me"}))
    write_jsonl(run / "seed.jsonl", [{"id": sid, "question": QUESTIONS.get(sid, f"Question {sid}?"),
                                      "answer": "#### 5"} for sid in HISTORY])
    write_jsonl(run / "metrics.jsonl", METRICS)
    for it in range(3):
        write_jsonl(run / f"iter_{it:02d}" / "seed_predictions.jsonl",
                    [{"id": sid, "prediction": "... #### 5", "answer": "5" if ok[it] else "4", "gold": "5",
                      "correct": ok[it]} for sid, ok in HISTORY.items()])
        aug = [{"id": f"aug{it}-{parent}-{k}", "question": "new?", "answer": "#### 1",
                "provenance": {"parent_id": parent, "iteration": it, "teacher_model": "teacher-7b",
                               "cache_key": f"{parent}{k}"}}
               for parent, n in AUGMENTED[it].items() for k in range(n)]
        write_jsonl(run / f"iter_{it:02d}" / "augmented.jsonl", aug)
    return run


def table_rows(text):
    lines = text.splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]  # skip header and rule


# ---- the iteration table ----------------------------------------------------------------------------------

def test_terminal_table_numbers(run_dir):
    rows = table_rows(report.render_table(report.load_run(run_dir)["metrics"]))
    assert rows[0] == ["0", "6", "3", "4", "6 (dup 3, bad_math 2, near_dup 1)", "50.0%", "45.7%", "1,234", "42.5s"]
    assert rows[1] == ["1", "10", "4", "5", "0", "33.3%", "-", "2,500", "2m05s"]
    assert rows[2] == ["2", "15", "3", "0", "0", "50.0%", "62.5%", "0", "58m20s"]


def test_terminal_table_columns_line_up(run_dir):
    lines = report.render_table(METRICS).splitlines()
    header, rule = lines[0], lines[1]
    # every numeric column is right-aligned: its last character sits at the end of its rule segment
    ends = [m.end() for m in re.finditer(r"-+", rule)]
    assert len(ends) == len(report.COLUMNS)
    for line in [header] + lines[2:]:
        for c, end in enumerate(ends):
            if report.COLUMNS[c] != "rejected":
                assert line[end - 1] != " ", (line, c)


def test_write_report_returns_table_and_writes_files(run_dir):
    text = report.write_report(run_dir)
    assert text == report.render_table(METRICS)
    assert (run_dir / "report.md").is_file() and (run_dir / "report.svg").is_file()
    assert not list(run_dir.glob("*.tmp"))


# ---- report.md --------------------------------------------------------------------------------------------

def unescaped_pipes(line):
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_header_table_and_chart(run_dir):
    report.write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "**task**: gsm8k" in md and "**teacher model**: teacher-7b" in md and "**seed size**: 6" in md
    assert "3 finished of 3 (0 to 2)" in md
    assert "sk-do-not-print-me" not in md and "api_key" not in md
    assert "![seed and test accuracy per iteration](report.svg)" in md
    table = [line for line in md.splitlines() if line.startswith("| 0 |")]
    assert table == ["| 0 | 6 | 3 | 4 | 6 (dup 3, bad\\_math 2, near\\_dup 1) | 50.0% | 45.7% | 1,234 | 42.5s |"]


def test_wrong_to_right_list_and_augmentation_counts(run_dir):
    fixed, n_right_to_wrong = report.seed_flips(report.load_run(run_dir))
    # counts: seed 0 had 2 parents at iter 0 + 1 at iter 1; seed 1 only iter 0; seed 2 was a parent at iter 1
    assert [(r["id"], r["became_right"], r["n_augmented"]) for r in fixed] == [
        ("gsm8k-train-1", 1, 1), ("gsm8k-train-0", 2, 3), ("gsm8k-train-2", 2, 2)]
    assert n_right_to_wrong == 2
    snippet = fixed[0]["snippet"]
    assert snippet.startswith("A train travels very") and snippet.endswith("…") and len(snippet) <= 80


def test_augmented_rows_count_only_before_the_seed_became_right():
    # built in memory: load_run returns plain data, so the counting rule can be pinned down on its own
    run = {"seed": {}, "augmented": {0: [{"provenance": {"parent_id": "s"}}], 1: [{"provenance": {"parent_id": "s"}}]},
           "seed_predictions": {i: [{"id": "s", "correct": ok}] for i, ok in enumerate([False, True, True])}}
    fixed, _ = report.seed_flips(run)
    assert [(r["id"], r["became_right"], r["n_augmented"]) for r in fixed] == [("s", 1, 1)]


def test_markdown_escapes_untrusted_question(run_dir):
    report.write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    row = [line for line in md.splitlines() if "gsm8k-train-0" in line]
    assert len(row) == 1, "a newline in the question must not split the row"
    row = row[0]
    assert unescaped_pipes(row) == 5  # 4 columns: the '|' inside the question is escaped
    assert "3 \\| 4 apples" in row
    assert "<b>" not in row and "&lt;b&gt;and&lt;/b&gt; &amp; buys" in row
    assert "right to wrong" in md and "at the last): 2." in md


def test_table_cells_escape_pipes_and_newlines_in_rejection_reasons(tmp_path):
    metrics = [dict(METRICS[0], rejected_by_reason={"a|b\nc": 6})]
    write_jsonl(tmp_path / "metrics.jsonl", metrics)
    report.write_report(tmp_path)
    row = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| 0 |")][0]
    assert unescaped_pipes(row) == len(report.COLUMNS) + 1 and "6 (a\\|b c 6)" in row


# ---- report.svg -------------------------------------------------------------------------------------------

def polylines(svg_text):
    root = ET.fromstring(svg_text)
    assert root.tag == SVG + "svg"
    return {p.get("class"): [tuple(map(float, xy.split(","))) for xy in p.get("points").split()]
            for p in root.iter(SVG + "polyline") if p.get("class")}


def test_svg_is_xml_with_two_lines(run_dir):
    report.write_report(run_dir)
    lines = polylines((run_dir / "report.svg").read_text())
    assert set(lines) == {"seed_acc", "test_acc"}
    assert len(lines["seed_acc"]) == 3
    assert len(lines["test_acc"]) == 2  # iteration 1 has no test accuracy
    # y grows downwards: 33% is drawn lower than 50%, and iterations advance left to right
    seed = lines["seed_acc"]
    assert seed[1][1] > seed[0][1] and seed[0][0] < seed[1][0] < seed[2][0]
    assert seed[0][1] == seed[2][1]


def test_svg_title_is_escaped():
    root = ET.fromstring(report.render_svg(METRICS, title='a <b> & "c"'))
    titles = [t.text for t in root.iter(SVG + "text") if t.text and "<b>" in t.text]
    assert titles == ['a <b> & "c"']


def test_svg_single_iteration_and_no_test_accuracy():
    metrics = [dict(METRICS[0], test_acc=None)]
    svg = report.render_svg(metrics)
    lines = polylines(svg)
    assert list(lines) == ["seed_acc"] and len(lines["seed_acc"]) == 1
    for element in ET.fromstring(svg).iter():
        for name in ("x", "y", "cx", "cy", "x1", "x2", "y1", "y2"):
            if element.get(name) is not None:
                assert math.isfinite(float(element.get(name)))
    assert "not measured" in svg


# ---- bad input ---------------------------------------------------------------------------------------------

def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(report.ReportError, match="no finished iteration in"):
        report.load_run(tmp_path)


def test_broken_metrics_line_names_file_and_line(run_dir):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "train_si')
    with pytest.raises(report.ReportError, match=r"metrics\.jsonl line 4: not valid JSON"):
        report.load_run(run_dir)


def test_partial_run_without_predictions_still_reports(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", METRICS[:1])
    table = report.write_report(tmp_path)
    assert "50.0%" in table
    md = (tmp_path / "report.md").read_text()
    assert "No seed example went from wrong to right." in md and "**task**: unknown" in md
