"""Report of an llm2llm run: what each iteration did, and which seed examples the loop fixed.

Reads a run directory written by llm2llm.py (config.json, seed.jsonl, metrics.jsonl, iter_NN/...) and writes
  RUN/report.md   header, a table per iteration, the accuracy chart, the seed examples that went wrong -> right
  RUN/report.svg  seed and test accuracy per iteration, drawn by hand as SVG (no plotting dependency)
The same table is returned as plain text for the terminal. It only reads files, so it can be run on a finished run,
a run that is still going, or one that crashed after some iterations:

    python llm2llm.py report runs/my_run      # or: python report.py runs/my_run

From Python: write_report(run_dir) -> text table; load_run(run_dir) -> dict; render_table(metrics) -> str.
"""

import json
import math
import os
import re
import sys
from pathlib import Path
from xml.sax.saxutils import escape as _xml_escape


class ReportError(Exception):
    """A run directory the report cannot be built from; the message says which file and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the run directory
# A report is often asked for because something went wrong, so a missing optional file (no seed predictions for an
# iteration, no config.json) only leaves a part of the report empty; only an unreadable metrics.jsonl stops it.

def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path} line {line_no}: not valid JSON ({e.msg}). If it is the last line, a kill "
                                  f"cut it short: resume the run, which repairs it. Otherwise restore the line, or "
                                  f"delete it and every line after it to redo those iterations.") from None
            if not isinstance(row, dict):
                raise ReportError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


def _read_jsonl_if_present(path):
    return _read_jsonl(path) if path.is_file() else []


def iter_dir(run_dir, iteration):
    return Path(run_dir) / f"iter_{iteration:02d}"


def load_run(run_dir):
    """Everything the report needs from run_dir, as plain data:
    {"run_dir": Path, "config": dict ({} when absent), "metrics": [row per finished iteration, by iteration],
     "seed": {id: row}, "seed_predictions": {iteration: [row]}, "augmented": {iteration: [row]},
     "mistakes": {iteration: [{"id", "mistakes", "by"}]}}"""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    metrics = _read_jsonl(metrics_path) if metrics_path.is_file() else []
    if not metrics:
        raise ReportError(f"no finished iteration in {run_dir} (no rows in {metrics_path}). Check the path, or wait "
                          f"until the first iteration has been trained and evaluated.")
    for line_no, row in enumerate(metrics, 1):
        if not isinstance(row.get("iteration"), int):
            raise ReportError(f"{metrics_path} row {line_no}: missing integer 'iteration' key; this file is not "
                              f"an llm2llm metrics file.")
    metrics.sort(key=lambda row: row["iteration"])

    config = {}
    if (run_dir / "config.json").is_file():
        try:
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ReportError(f"{run_dir / 'config.json'} line {e.lineno}: not valid JSON ({e.msg}).") from None
        if not isinstance(config, dict):
            config = {}

    iterations = [row["iteration"] for row in metrics]
    return {
        "run_dir": run_dir,
        "config": config,
        "metrics": metrics,
        "seed": {str(row.get("id")): row for row in _read_jsonl_if_present(run_dir / "seed.jsonl")},
        "seed_predictions": {i: _read_jsonl_if_present(iter_dir(run_dir, i) / "seed_predictions.jsonl")
                             for i in iterations},
        "augmented": {i: _read_jsonl_if_present(iter_dir(run_dir, i) / "augmented.jsonl") for i in iterations},
        "mistakes": {i: _read_jsonl_if_present(iter_dir(run_dir, i) / "mistakes.jsonl") for i in iterations},
    }


# ----------------------------------------------------------------------------------------------------------------
# The per-iteration table
# One list of cells feeds both the terminal and the markdown table, so the two can never disagree. Keys that a run
# did not record (older runs, no test set) print as "-" rather than failing the whole report.

COLUMNS = ["iter", "train", "wrong", "augmented", "rejected", "seed acc", "test acc", "teacher tok", "time"]
# shown only for runs that recorded them: FLOPs need the teacher's size, dollars its prices
COST_COLUMNS = {"teacher FLOPs": "teacher_flops", "teacher USD": "teacher_cost_usd"}
# shown only for runs that found their mistakes another way than the trained student's answers (--mistakes)
MISTAKE_COLUMNS = ["mistakes", "wrong after training", "mistakes time"]


def finds_mistakes_apart(metrics):
    return any(m.get("mistakes", "train") != "train" for m in metrics)


def columns(metrics):
    return COLUMNS + (MISTAKE_COLUMNS if finds_mistakes_apart(metrics) else []) + [
        name for name, key in COST_COLUMNS.items() if any(m.get(key) is not None for m in metrics)]


def _pct(fraction):
    if fraction is None or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
        return "-"
    return f"{100 * fraction:.1f}%"


def _count(value):
    return f"{value:,}" if isinstance(value, int) else "-"


def _duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _cost(value, key):
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.3g}" if key == "teacher_flops" else f"{value:.4f}"


def _sum_known(row, keys):
    values = [row.get(k) for k in keys if isinstance(row.get(k), (int, float))]
    return sum(values) if values else None


def rejected_cell(row):
    """'6 (dup 3, bad_math 2, near_dup 1)': total, then reasons by count so the main failure mode reads first."""
    by_reason = row.get("rejected_by_reason") or {}
    total = row.get("n_rejected", sum(by_reason.values()))
    if not by_reason or not total:
        return _count(total)
    reasons = sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{total} (" + ", ".join(f"{reason} {n}" for reason, n in reasons if n) + ")"


def table_cells(metrics):
    """One list of display strings per iteration, in columns(metrics) order."""
    rows, cost = [], [COST_COLUMNS[name] for name in columns(metrics) if name in COST_COLUMNS]
    apart = finds_mistakes_apart(metrics)
    for m in metrics:
        tokens = _sum_known(m, ["teacher_prompt_tokens", "teacher_completion_tokens"])
        rows.append([
            str(m["iteration"]),
            _count(m.get("train_size")),
            _count(m.get("n_wrong")),
            _count(m.get("n_augmented")),
            rejected_cell(m),
            _pct(m.get("seed_acc")),
            _pct(m.get("test_acc")),
            _count(tokens),
            _duration(_sum_known(m, ["train_seconds", "eval_seconds", "mistakes_seconds", "teacher_seconds"])),
        ] + ([m.get("mistakes", "train"), _count(m.get("n_wrong_train", m.get("n_wrong"))),
              _duration(m.get("mistakes_seconds") or 0.0)] if apart else [])
            + [_cost(m.get(key), key) for key in cost])
    return rows


def render_table(metrics):
    """Fixed-width plain-text table; columns are separated by at least two spaces."""
    rows = [columns(metrics)] + table_cells(metrics)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    left_aligned = {COLUMNS.index("rejected")}  # free text; everything else is a number and reads best right-aligned

    def line(cells):
        return "  ".join(cell.ljust(w) if c in left_aligned else cell.rjust(w)
                         for c, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(rows[0]), line(["-" * w for w in widths])] + [line(r) for r in rows[1:]])


# ----------------------------------------------------------------------------------------------------------------
# Sampled solutions (--teacher-mode solutions/both): coverage@k, diversity@k and false-positive estimates, one row
# per iteration that sampled any. A separate table, so runs without solutions read exactly as before.

SAMPLING_COLUMNS = ["iter", "k", "solutions", "answer-correct", "coverage@k", "diversity@k", "FPR (notes)",
                    "FPR (judge)"]


def sampling_cells(metrics):
    return [[str(m["iteration"]), _count(m.get("k")), _count(m.get("n_solutions")), _count(m.get("n_answer_correct")),
             _pct(m.get("coverage_at_k")),
             f"{m['diversity_at_k']:.2f}" if isinstance(m.get("diversity_at_k"), (int, float)) else "-",
             _pct(m.get("fpr_estimate")), _pct(m.get("fpr_judge"))] for m in metrics if "k" in m]


def render_sampling_table(metrics):
    """The plain-text table of sampled solutions, or "" when no iteration sampled any."""
    rows = sampling_cells(metrics)
    if not rows:
        return ""
    rows = [SAMPLING_COLUMNS] + rows
    widths = [max(len(r[c]) for r in rows) for c in range(len(SAMPLING_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


# ----------------------------------------------------------------------------------------------------------------
# Escaping
# Example texts come from datasets and from the teacher: untrusted. In markdown, '|' would split a table cell, a
# newline would end the row, and '<' could open raw HTML; in SVG, '<' and '&' would break the XML.

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def md_escape(text):
    text = " ".join(str(text).split())  # newlines and tabs would break a table row
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def svg_escape(text):
    return _xml_escape(" ".join(str(text).split()), {'"': "&quot;"})


# ----------------------------------------------------------------------------------------------------------------
# Which seed examples changed
# The point of LLM2LLM is that teacher examples written from a wrong seed make the student get that seed right. We
# follow each seed id across iterations and report the ones that end right after having been wrong, together with
# how many accepted teacher examples were written from them before they became right.

PROMPT_FIELDS = ("question", "text", "citing_prompt", "input")


def snippet(row, limit=80):
    for field in PROMPT_FIELDS:
        if isinstance(row.get(field), str) and row[field].strip():
            text = " ".join(row[field].split())
            return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"
    return ""


def seed_flips(run):
    """(wrong_to_right, n_right_to_wrong).

    wrong_to_right: seeds right in the last iteration that has seed predictions and wrong at some iteration before;
    each is {"id", "became_right" (first iteration of its final run of correct answers), "n_augmented" (accepted
    teacher rows with it as parent in iterations before became_right), "snippet"}, sorted by (became_right, id).
    n_right_to_wrong: seeds wrong in that last iteration that were right at some iteration before."""
    history = {}  # seed id -> [(iteration, correct)] in iteration order
    for iteration in sorted(run["seed_predictions"]):
        for row in run["seed_predictions"][iteration]:
            history.setdefault(str(row.get("id")), []).append((iteration, bool(row.get("correct"))))
    if not history:
        return [], 0
    last = max(i for i in run["seed_predictions"] if run["seed_predictions"][i])

    parents = {}  # (parent id, iteration) -> accepted teacher rows written from it in that iteration
    for iteration, rows in run["augmented"].items():
        for row in rows:
            parent = (row.get("provenance") or {}).get("parent_id")
            if parent is not None:
                parents[str(parent), iteration] = parents.get((str(parent), iteration), 0) + 1

    wrong_to_right, n_right_to_wrong = [], 0
    for seed_id, steps in history.items():
        final_iteration, final_correct = steps[-1]
        if final_iteration != last:
            continue  # not evaluated in the last iteration: nothing to say about where it ended
        earlier = [correct for _, correct in steps[:-1]]
        if not final_correct:
            n_right_to_wrong += any(earlier)
            continue
        k = len(steps) - 1
        while k > 0 and steps[k - 1][1]:
            k -= 1  # walk back to the start of the final run of correct answers
        if k == 0:
            continue  # right all along
        became_right = steps[k][0]
        wrong_to_right.append({
            "id": seed_id,
            "became_right": became_right,
            "n_augmented": sum(n for (p, i), n in parents.items() if p == seed_id and i < became_right),
            "snippet": snippet(run["seed"].get(seed_id, {})),
        })
    wrong_to_right.sort(key=lambda r: (r["became_right"], r["id"]))
    return wrong_to_right, n_right_to_wrong


# ----------------------------------------------------------------------------------------------------------------
# The accuracy chart
# Hand-written SVG keeps plotting libraries out of the dependencies. The y axis is always 0-100% so charts of
# different runs compare at a glance; iterations without a test accuracy are simply left out of the test line.

def render_svg(metrics, title="llm2llm: accuracy per iteration"):
    width, height = 640, 400
    left, right, top, bottom = 64, 24, 48, 80  # bottom margin holds the x label and the legend
    plot_w, plot_h = width - left - right, height - top - bottom
    iterations = [m["iteration"] for m in metrics]
    lo, hi = min(iterations), max(iterations)

    pad = 16  # keeps the first and last markers off the axis line

    def x(iteration):  # a single iteration sits in the middle instead of dividing by zero
        return left + plot_w / 2 if hi == lo else left + pad + (plot_w - 2 * pad) * (iteration - lo) / (hi - lo)

    def y(fraction):
        return top + plot_h * (1 - min(max(fraction, 0.0), 1.0))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.1f}" y="28" text-anchor="middle" font-size="16">{svg_escape(title)}</text>']
    for pct in range(0, 101, 20):
        py = y(pct / 100)
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + plot_w}" y2="{py:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 8}" y="{py + 4:.1f}" text-anchor="end">{pct}%</text>')
    step = max(1, math.ceil(len(iterations) / 12))  # keep x labels readable on long runs
    for iteration in iterations[::step]:
        px = x(iteration)
        out.append(f'<line x1="{px:.1f}" y1="{top + plot_h}" x2="{px:.1f}" y2="{top + plot_h + 5}" stroke="black"/>')
        out.append(f'<text x="{px:.1f}" y="{top + plot_h + 19}" text-anchor="middle">{iteration}</text>')
    out.append(f'<polyline points="{left},{top} {left},{top + plot_h} {left + plot_w},{top + plot_h}" '
               f'fill="none" stroke="black"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 38}" text-anchor="middle">iteration</text>')
    out.append(f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'accuracy</text>')

    series = [("seed_acc", "seed accuracy", "#1f77b4"), ("test_acc", "test accuracy", "#ff7f0e")]
    legend_x = left
    for key, label, color in series:
        points = [(m["iteration"], m[key]) for m in metrics
                  if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        if points:
            coords = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in points)
            out.append(f'<polyline class="{key}" points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
            for i, v in points:
                out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="4" fill="{color}">'
                           f'<title>iteration {i}: {label} {_pct(v)}</title></circle>')
        legend_y = height - 18
        shown = label if points else f"{label} (not measured)"
        out.append(f'<line x1="{legend_x}" y1="{legend_y}" x2="{legend_x + 24}" y2="{legend_y}" stroke="{color}" '
                   f'stroke-width="2"/><circle cx="{legend_x + 12}" cy="{legend_y}" r="4" fill="{color}"/>')
        out.append(f'<text x="{legend_x + 30}" y="{legend_y + 4}">{svg_escape(shown)}</text>')
        legend_x += 200
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# report.md
# The header names only a few chosen config fields: config.json is never dumped, so nothing sensitive that might
# one day be added to it can leak into a report that gets shared.

def _first(config, *keys):
    for key in keys:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value not in (None, "", {}, []):
            return value
    return None


def _header(run):
    config, metrics = run["config"], run["metrics"]
    teacher = _first(config, "teacher_model", "teacher.model")
    if teacher is None:  # older configs: the model is still recorded in each accepted row's provenance
        teacher = next((r["provenance"]["teacher_model"] for rows in run["augmented"].values() for r in rows
                        if isinstance(r.get("provenance"), dict) and r["provenance"].get("teacher_model")), None)
    seed_size = _first(config, "seed_size", "n_seed") or metrics[0].get("n_seed") or len(run["seed"]) or None
    rounds = _first(config, "iterations")  # augmentation rounds after the first fine-tune: rounds + 1 students
    finished = f"{len(metrics)} finished" + (f" of {rounds + 1} (0 to {rounds})" if rounds is not None else "")
    fields = [("task", _first(config, "task", "task_name")),
              ("student", _first(config, "student", "student_model", "model")),
              ("teacher model", teacher),
              ("seed size", seed_size),
              ("iterations", finished)]
    return [f"- **{name}**: {md_escape(value) if value is not None else 'unknown'}" for name, value in fields]


def _markdown_table(metrics):
    names = columns(metrics)
    lines = ["| " + " | ".join(names) + " |",
             "|" + "|".join("---" if c == "rejected" else "---:" for c in names) + "|"]
    for cells in table_cells(metrics):
        lines.append("| " + " | ".join(md_escape(cell) for cell in cells) + " |")
    return lines


def render_markdown(run):
    wrong_to_right, n_right_to_wrong = seed_flips(run)
    name = md_escape(Path(run["run_dir"]).resolve().name)
    lines = [f"# llm2llm run report: {name}", ""] + _header(run) + ["", "## Iterations", ""]
    lines += _markdown_table(run["metrics"])
    lines += ["", "*wrong* counts the seed examples this iteration's student gets wrong; *augmented* and *rejected* "
                  "count the teacher rows written from them (accepted rows join the next iteration's training data); "
                  "*teacher tok* is prompt + completion tokens; *time* is train + eval + mistake-finding + teacher "
              "time." + (" *wrong* counts the seed examples flagged under *mistakes* (--mistakes), *wrong after "
                         "training* those the trained student answers wrong; *mistakes time* is the extra training "
                         "and evaluation spent finding them (the last student's are not searched: no teacher "
                         "round follows)." if finds_mistakes_apart(run["metrics"]) else "") +
              (" *teacher FLOPs* is 2 x the teacher's parameters x its tokens, *teacher USD* its tokens at the "
               "given prices per million." if any(c in COST_COLUMNS for c in columns(run["metrics"])) else ""),
              ""]
    sampled = sampling_cells(run["metrics"])
    if sampled:
        lines += ["## Sampled solutions", "", "| " + " | ".join(SAMPLING_COLUMNS) + " |",
                  "|" + "---:|" * len(SAMPLING_COLUMNS)] + ["| " + " | ".join(r) + " |" for r in sampled]
        lines += ["", "*coverage@k*: share of the problems sent with at least one answer-correct solution among k; "
                      "*diversity@k*: mean number of distinct answer-correct solutions per problem; *FPR (notes)*: "
                      "share of answer-correct solutions with a wrong <<a*b=c>> calculator note (a lower bound); "
                      "*FPR (judge)*: share the judge rated unsound.", ""]
    lines += ["![seed and test accuracy per iteration](report.svg)", ""]
    lines += mistakes_section(run)
    lines += ["## Seed examples fixed by the loop", ""]
    if wrong_to_right:
        n = len(wrong_to_right)
        lines += [f"{n} seed example{'s were' if n > 1 else ' was'} wrong at some iteration and "
                  f"{'are' if n > 1 else 'is'} right at the last one. "
                  "*augmented before* counts accepted teacher examples written from the seed before it became right.",
                  "", "| seed id | right from iteration | augmented before | prompt |", "|---|---:|---:|---|"]
        lines += [f"| {md_escape(r['id'])} | {r['became_right']} | {r['n_augmented']} | {md_escape(r['snippet'])} |"
                  for r in wrong_to_right]
    else:
        lines.append("No seed example went from wrong to right.")
    lines += ["", f"Seed examples that went from right to wrong (right at some iteration, wrong at the last): "
                  f"{n_right_to_wrong}.", ""]
    return "\n".join(lines)


def mistakes_section(run):
    """The seed examples each iteration flagged as mistakes (the teacher's parents with --augment wrong), each with
    the --mistakes mode that flagged it and how."""
    flagged = {i: rows for i, rows in run["mistakes"].items() if rows}
    if not flagged:
        return []
    lines = ["## Seed examples flagged as mistakes", "",
             "| iter | seed id | mistakes | flagged because | prompt |", "|---:|---|---|---|---|"]
    for i, rows in sorted(flagged.items()):
        lines += [f"| {i} | {md_escape(r.get('id'))} | {md_escape(r.get('mistakes', 'train'))} | "
                  f"{md_escape(r.get('by', ''))} | {md_escape(snippet(run['seed'].get(str(r.get('id')), {})))} |"
                  for r in rows]
    return lines + [""]


def _write_atomic(path, text):
    # a reader (or a crash) never sees half a report
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir):
    """Write RUN/report.md and RUN/report.svg; return the plain-text table for the terminal."""
    run = load_run(run_dir)
    task = _first(run["config"], "task", "task_name")
    title = f"llm2llm: accuracy per iteration ({task})" if task else "llm2llm: accuracy per iteration"
    _write_atomic(run["run_dir"] / "report.svg", render_svg(run["metrics"], title=title))
    _write_atomic(run["run_dir"] / "report.md", render_markdown(run))
    sampling = render_sampling_table(run["metrics"])
    return render_table(run["metrics"]) + ("\n\n" + sampling if sampling else "")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python report.py RUN_DIR")
    try:
        print(write_report(sys.argv[1]))
    except ReportError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {Path(sys.argv[1]) / 'report.md'} and {Path(sys.argv[1]) / 'report.svg'}")
