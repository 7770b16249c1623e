"""Compare two teachers at matched sampling compute: which one trains the better student for the same cost?

"Smaller, Weaker, Yet Better" (Bansal et al., 2024) compares a strong, expensive teacher with a weaker, cheaper one
at the same sampling budget. A sample costs about 2 * params FLOPs per token, so at equal compute the cheaper
teacher writes more samples per problem:

    S_WC = (P_SE / P_WC) * S_SE

with P the parameter counts of the strong, expensive (SE) and weak, cheap (WC) teacher and S their samples per
problem. This command sets S_SE = k (--samples-per-wrong in solutions mode, --aug-per-wrong in questions mode; both
in both), gives the cheaper teacher round(P_SE / P_WC * k), at least 1, and runs the loop with each teacher over
several seeds:

    python compare_teachers.py --task gsm8k --out runs/teachers --seeds 0,1,2 \\
        --teacher-a http://host-a:8000/v1 --model-a gemma-2-9b-it --params-a 9e9 \\
        --teacher-b http://host-b:8000/v1 --model-b gemma-2-27b-it --params-b 27e9 \\
        --teacher-mode solutions --samples-per-wrong 4 [any loop flag]

A teacher is an OpenAI-compatible base URL (then --model-X names the model there) or a model id or folder, which the
embedded server loads (its parameter count is then read from its config when --params-X is not given). With
--price-in-X/--price-out-X (USD per million prompt/completion tokens) each run also reports its dollar cost, and
--match price matches by price instead of parameters: a sample's price is then taken as price-in + price-out (a
sample with as many prompt as completion tokens).

Every teacher x seed is an ordinary, resumable run directory, DIR/<label>-seed<k> (read any with `llm2llm.py
report`); a killed comparison resumes where it stopped when run again with the same command. The first student
(iteration 0) does not depend on the teacher: it is trained once per seed and shared, so in the first round both
teachers are asked about exactly the same wrong seed problems. Each teacher keeps its own reply cache (two servers
may serve different models under one name). Output: a table on the terminal, DIR/compare_teachers.md,
DIR/compare_teachers.json and DIR/compare_teachers.svg. Per teacher: its k, coverage@k, diversity@k and false
positive rate of the first round (from the runs' metrics; n/a where the runs did not sample solutions), teacher
examples accepted, tokens, FLOPs and dollars, and the final student's test accuracy: mean over seeds with a 95%
t-interval and a paired bootstrap of A against B on the same test items (compare.py's statistics).
"""
import argparse
import math
import os
import sys
from dataclasses import replace

import compare
import llm2llm
from config import RunError, parse_args as parse_loop_args
from cost import count_parameters
from report import md_escape
from rundir import write_json

LABELS = ("a", "b")
# loop flags each teacher's runs set themselves, so the comparison cannot take them
TEACHER_FLAGS = ("--teacher-url", "--teacher-model", "--teacher-params", "--teacher-price-in", "--teacher-price-out",
                 "--seed", "--out", "--first-student")
RULE = "S_WC = (P_SE / P_WC) * S_SE (Bansal et al. 2024): at equal sampling compute, the cheaper teacher writes " \
       "(cost of the expensive one / cost of the cheaper one) times as many samples per problem"


# -----------------------------------------------------------------------------
# Command line: the comparison's own flags and two teachers; everything else is a loop flag for every run

def is_url(spec):
    return spec.startswith(("http://", "https://"))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="compare_teachers.py", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Every other flag is a loop flag (see `llm2llm.py --help`) and applies "
                                            "to every run.")
    parser.add_argument("--out", required=True, help="comparison directory; the same --out resumes")
    for x in LABELS:
        parser.add_argument(f"--teacher-{x}", required=True, help=f"teacher {x.upper()}: an OpenAI-compatible base "
                                                                  f"URL, or a model id/folder for the embedded server")
        parser.add_argument(f"--model-{x}", help=f"teacher {x.upper()}'s model name at its URL (needed with a "
                                                 f"URL)")
        parser.add_argument(f"--params-{x}", type=float, help=f"teacher {x.upper()}'s number of parameters, e.g. 9e9 "
                                                              f"(default: counted from an embedded teacher's config)")
        parser.add_argument(f"--price-in-{x}", type=float, help=f"teacher {x.upper()}: USD per million prompt tokens")
        parser.add_argument(f"--price-out-{x}", type=float, help=f"teacher {x.upper()}: USD per million completion "
                                                                 f"tokens")
        parser.add_argument(f"--label-{x}", default=x, help=f"teacher {x.upper()}'s name in run directories and "
                                                            f"tables (default: {x})")
    parser.add_argument("--match", default="auto", choices=("auto", "params", "price"),
                        help="match sampling compute by parameters or by price (default: auto, parameters when both "
                             "are known, else prices)")
    compare.add_seed_flags(parser)
    args, rest = parser.parse_known_args(argv)
    taken = [flag for flag in TEACHER_FLAGS if any(a == flag or a.startswith(flag + "=") for a in rest)]
    if taken:
        raise RunError(f"{', '.join(taken)}: set for each teacher in a teacher comparison; use --teacher-a/b, "
                               f"--model-a/b, --params-a/b, --price-in-a/b, --price-out-a/b, --seeds and --out")
    base = parse_loop_args(rest)
    seeds = compare.read_seeds(args, base)
    if base.iterations < 1:
        raise RunError("--iterations 0 never asks a teacher: nothing to compare")
    if args.label_a == args.label_b:
        raise RunError(f"--label-a and --label-b are both {args.label_a!r}: give the teachers different names")
    for x in LABELS:
        label = getattr(args, f"label_{x}")
        if not label or any(c in label for c in "/\\") or label.startswith("."):
            raise RunError(f"--label-{x} {label!r} names a run directory: use letters, digits, - and _")
    return base, teachers(args), seeds, args


def teachers(args):
    """Both teachers as {label, url, model, params, price_in, price_out}, in the order A, B."""
    out = []
    for x in LABELS:
        spec = getattr(args, f"teacher_{x}")
        url = spec if is_url(spec) else None
        if url is None and os.environ.get("OPENAI_BASE_URL"):
            raise RunError(f"--teacher-{x} {spec} is a model for the embedded server, but $OPENAI_BASE_URL is "
                                   f"set and the loop would send its requests there: unset it, or give a URL")
        model = getattr(args, f"model_{x}") or spec
        if url and not getattr(args, f"model_{x}"):
            raise RunError(f"--teacher-{x} is a URL: name the model it serves with --model-{x}")
        if url is None and getattr(args, f"model_{x}") not in (None, spec):
            raise RunError(f"--model-{x} names the model at a URL; the embedded server loads --teacher-{x} "
                                   f"({spec}) itself")
        price_in, price_out = getattr(args, f"price_in_{x}"), getattr(args, f"price_out_{x}")
        if (price_in is None) != (price_out is None):
            raise RunError(f"give both --price-in-{x} and --price-out-{x} (USD per million prompt and "
                                   f"completion tokens; 0 for a side that is free)")
        out.append({"label": getattr(args, f"label_{x}"), "url": url, "model": model,
                    "params": getattr(args, f"params_{x}"), "price_in": price_in, "price_out": price_out})
    return out


# -----------------------------------------------------------------------------
# The matching rule

def matched_samples(teachers_, k, match="auto"):
    """Set each teacher's "k" by the rule, and return (what was matched, the cost ratio). The more expensive teacher
    gets k samples per problem, the cheaper one cost ratio * k rounded (half up), at least 1; equal costs give both
    k."""
    def known(key):
        return all(t[key] is not None for t in teachers_)

    for t in teachers_:
        if t["params"] is None and t["url"] is None:
            try:  # the embedded teacher: its size is in its config
                t["params"] = count_parameters(t["model"])
            except (OSError, ValueError, KeyError) as e:
                print(f"note: could not count the parameters of {t['model']} ({str(e).splitlines()[0]})")
    if match == "auto":
        match = "params" if known("params") else "price" if known("price_in") else None
        if match is None:
            raise RunError("the matching rule needs both teachers' sizes (--params-a and --params-b) or both "
                                   "teachers' prices (--price-in-a/--price-out-a and --price-in-b/--price-out-b)")
    if match == "params" and not known("params"):
        raise RunError("--match params needs both teachers' sizes: pass --params-a and --params-b (e.g. 9e9)")
    if match == "price" and not known("price_in"):
        raise RunError("--match price needs both teachers' prices: pass --price-in-a/--price-out-a and "
                               "--price-in-b/--price-out-b")
    for t in teachers_:
        t["cost"] = t["params"] if match == "params" else t["price_in"] + t["price_out"]
        if not t["cost"] > 0:
            raise RunError(f"teacher {t['label']}: its {'size' if match == 'params' else 'price'} must be "
                                   f"positive to match compute by it, got {t['cost']}")
    expensive, cheap = sorted(teachers_, key=lambda t: t["cost"], reverse=True)
    ratio = expensive["cost"] / cheap["cost"]
    expensive["k"], cheap["k"] = k, max(1, math.floor(ratio * k + 0.5))  # half rounds up, as one would by hand
    return match, ratio


def matched_field(mode):
    """The loop flags that say how many samples a teacher writes per wrong seed, by --teacher-mode."""
    return {"questions": ("aug_per_wrong",), "solutions": ("samples_per_wrong",),
            "both": ("aug_per_wrong", "samples_per_wrong")}.get(mode, ("aug_per_wrong",))


def teacher_config(base, teacher, seed, out):
    run_dir = os.path.join(out, f"{teacher['label']}-seed{seed}")
    budget = any(v is not None for v in (base.teacher_budget_tokens, base.teacher_budget_flops,
                                          base.teacher_budget_usd))
    # one cache per teacher, shared by its seeds; with a budget each run keeps its own (as in compare.py). A cache
    # key holds the model name but not the endpoint, and two endpoints may serve different models under one name,
    # so a --teacher-cache given by the user is split by teacher too: teacher B never reads teacher A's replies
    if base.teacher_cache:
        cache = os.path.join(base.teacher_cache, teacher["label"])
    else:
        cache = None if budget else os.path.join(out, f"teacher_cache-{teacher['label']}")
    cfg = replace(base, seed=seed, out=run_dir, teacher_cache=cache, teacher_url=teacher["url"],
                  teacher_model=teacher["model"], teacher_params=teacher["params"],
                  teacher_price_in=teacher["price_in"], teacher_price_out=teacher["price_out"])
    for name in matched_field(base.teacher_mode):
        setattr(cfg, name, teacher["k"])
    return cfg


# -----------------------------------------------------------------------------
# Reading the runs: compare.py's result plus the teacher-data numbers of the first round and the costs

FIRST_ROUND = ("coverage_at_k", "diversity_at_k", "fpr_estimate", "fpr_judge")


def load_result(run_dir):
    result = compare.load_result(run_dir)
    first = result["metrics"][0]
    for key in FIRST_ROUND:
        result[key] = first.get(key)

    def total(key):  # None when some iteration could not count it (no size or no prices)
        values = [m.get(key) for m in result["metrics"]]
        return None if any(v is None for v in values) else sum(values)

    result["teacher_flops"], result["teacher_cost_usd"] = total("teacher_flops"), total("teacher_cost_usd")
    return result


def _mean_known(values):
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarize(results, teachers_, seeds, base, args, match, ratio):
    labels = [t["label"] for t in teachers_]
    summary = {"task": base.task, "student": base.student, "seeds": seeds, "teacher_mode": base.teacher_mode,
               "rule": RULE, "match": match, "cost_ratio": ratio,
               "matched_flags": ["--" + name.replace("_", "-") for name in matched_field(base.teacher_mode)],
               "teachers": {t["label"]: {k: t[k] for k in ("url", "model", "params", "price_in", "price_out", "k")}
                            for t in teachers_},
               "first_round": "the values of iteration 0, where both teachers are asked about the same wrong seed "
                              "problems (one shared first student per seed)",
               "interval": "95% t-interval across seeds: mean +- t(0.975, n-1) * sd / sqrt(n)",
               "bootstrap": {"resamples": args.bootstrap_resamples, "seed": args.bootstrap_seed},
               "results": {}, "paired": None, "seconds": {}}
    for label in labels:
        done = [s for s in seeds if (label, s) in results]
        if not done:
            continue
        runs = [results[label, s] for s in done]
        mean, interval = compare.mean_interval([r["test_acc"] for r in runs])
        length = max(len(r["curve"]) for r in runs)
        curves = [r["curve"] + [r["curve"][-1]] * (length - len(r["curve"])) for r in runs]
        points = [compare.mean_interval([c[i] for c in curves]) for i in range(length)]
        summary["results"][label] = dict(
            {key: [r[key] for r in runs] for key in FIRST_ROUND + ("teacher_accepted", "teacher_tokens",
                                                                   "teacher_flops", "teacher_cost_usd")},
            seeds=done, test_acc=[r["test_acc"] for r in runs], mean=mean, ci=interval,
            curve={"mean": [m for m, _ in points], "ci": [ci for _, ci in points]})
        summary["seconds"][label] = [r["seconds"] for r in runs]
    a, b = labels
    paired_seeds = [s for s in seeds if (a, s) in results and (b, s) in results]
    if paired_seeds:
        summary["paired"] = dict(compare.paired_bootstrap(
            {s: results[a, s]["correct"] for s in paired_seeds}, {s: results[b, s]["correct"] for s in paired_seeds},
            args.bootstrap_resamples, args.bootstrap_seed), seeds=paired_seeds)
    return summary


# -----------------------------------------------------------------------------
# Tables: compare_teachers.json holds every number; the terminal table and the markdown are drawn from it

COLUMNS = ["teacher", "model", "params", "k", "seeds", "test acc", "95% CI", "per seed", "coverage@k", "diversity@k",
           "FPR", "accepted", "teacher tok", "FLOPs", "cost USD"]


def _or_na(value, fmt):
    return "n/a" if value is None else fmt(value)


def table_rows(summary):
    rows = []
    for label, r in summary["results"].items():
        t = summary["teachers"][label]
        ci = f"[{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]" if r["ci"] else "-"
        fpr, judge = _mean_known(r["fpr_estimate"]), _mean_known(r["fpr_judge"])
        fpr = _or_na(fpr, lambda v: f"{100 * v:.1f}%") + ("" if judge is None else f" (judge {100 * judge:.1f}%)")
        rows.append([label, t["model"], _or_na(t["params"], lambda v: f"{v:.3g}"), str(t["k"]), str(len(r["seeds"])),
                     f"{100 * r['mean']:.1f}%", ci, " ".join(f"{100 * v:.1f}" for v in r["test_acc"]),
                     _or_na(_mean_known(r["coverage_at_k"]), lambda v: f"{100 * v:.1f}%"),
                     _or_na(_mean_known(r["diversity_at_k"]), lambda v: f"{v:.2f}"),
                     fpr,
                     f"{compare._mean(r['teacher_accepted']):,.0f}", f"{compare._mean(r['teacher_tokens']):,.0f}",
                     _or_na(_mean_known(r["teacher_flops"]) if None not in r["teacher_flops"] else None,
                            lambda v: f"{v:.3g}"),
                     _or_na(_mean_known(r["teacher_cost_usd"]) if None not in r["teacher_cost_usd"] else None,
                            lambda v: f"{v:.4f}")])
    return rows


def paired_line(summary):
    p = summary["paired"]
    if not p:
        return None
    a, b = summary["teachers"]
    return (f"{a} - {b}: {compare._points(p['diff'])} points of test accuracy "
            f"(95% CI [{compare._points(p['ci'][0])}, {compare._points(p['ci'][1])}], p = {p['p']:.4f}; "
            f"{len(p['seeds'])} seeds x {p['n_items']} items)")


def rule_lines(summary):
    teachers_ = summary["teachers"]
    unit = "parameters" if summary["match"] == "params" else "price in + out per million tokens"
    cost = {label: t["params"] if summary["match"] == "params" else t["price_in"] + t["price_out"]
            for label, t in teachers_.items()}
    flags = " and ".join(summary["matched_flags"])
    return [f"matching rule: {summary['rule']}",
            f"matched by {unit}: " + ", ".join(f"{label} {cost[label]:.4g}" for label in teachers_) +
            f"; ratio {summary['cost_ratio']:.4g}",
            f"samples per wrong seed example ({flags}, --teacher-mode {summary['teacher_mode']}): " +
            ", ".join(f"{label} k = {t['k']}" for label, t in teachers_.items())]


def render_table(summary):
    rows = table_rows(summary)
    widths = [max(len(r[c]) for r in [COLUMNS] + rows) for c in range(len(COLUMNS))]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows]
    paired = paired_line(summary)
    return "\n".join(lines + ([paired] if paired else []))


def render_markdown(summary, base):
    seed_size = f"{base.seed_size} examples" if base.seed_size is not None else f"{base.seed_frac:g} of train"
    lines = ["# llm2llm teacher comparison at matched compute", "",
             f"- **task**: {md_escape(base.task)}", f"- **student**: {md_escape(base.student)}",
             f"- **teacher mode**: {md_escape(base.teacher_mode)}", f"- **seed set**: {seed_size}",
             f"- **iterations**: {base.iterations}", f"- **seeds**: {', '.join(map(str, summary['seeds']))}", ""]
    lines += [f"- {md_escape(text)}" for text in rule_lines(summary)]
    lines += ["", "## Teachers", "", "| " + " | ".join(COLUMNS) + " |", "|---|---" + "|---:" * (len(COLUMNS) - 2) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in table_rows(summary)]
    lines += ["", "*test acc* is the final student's test accuracy, averaged over seeds, with a " +
              summary["interval"] + "; *per seed* lists each seed's value. *coverage@k* (problems with at least "
              "one correct solution among k), *diversity@k* (unique correct solutions per problem) and *FPR* "
              "(answer-correct solutions with wrong reasoning) are " + summary["first_round"] + ", averaged over "
              "seeds; n/a where the runs did not sample solutions. *accepted*, *teacher tok*, *FLOPs* (2 x "
              "parameters x tokens) and *cost USD* are means per run over all its iterations.", ""]
    paired = paired_line(summary)
    if paired:
        lines += ["## Paired test", "", md_escape(paired) + ": a paired bootstrap over test items, pooled across "
                  "seeds (items resampled with their results in every seed).", ""]
    lines += ["![test accuracy per iteration, mean over seeds with its 95% t-interval](compare_teachers.svg)", ""]
    return "\n".join(lines)


def write_outputs(summary, base, out):
    write_json(os.path.join(out, "compare_teachers.json"), summary)
    svg = compare.render_svg(summary, f"teachers at matched compute: test accuracy ({base.task})")
    compare.write_texts(out, {"compare_teachers.md": render_markdown(summary, base), "compare_teachers.svg": svg})
    return render_table(summary)


# -----------------------------------------------------------------------------
# The comparison: seed by seed, teacher A first (it trains the seed's first student, which B shares)

def compare_teachers(base, teachers_, seeds, args, run=None):
    run = run or llm2llm.run
    if base.seed_size is None and base.seed_frac is None:
        base.seed_frac = 0.01  # as run() resolves it, so finished runs are recognised without loading a model
    k = {"questions": base.aug_per_wrong}.get(base.teacher_mode, base.samples_per_wrong)
    if k < 1:
        raise RunError(f"the stronger teacher's k must be positive, got {k}")
    match, ratio = matched_samples(teachers_, k, args.match)
    os.makedirs(args.out, exist_ok=True)
    preview = {"rule": RULE, "match": match, "cost_ratio": ratio, "teacher_mode": base.teacher_mode,
               "matched_flags": ["--" + n.replace("_", "-") for n in matched_field(base.teacher_mode)],
               "teachers": {t["label"]: t for t in teachers_}}
    print("\n".join(rule_lines(preview)))
    total = len(teachers_) * len(seeds)
    print(f"comparing teachers {', '.join(t['label'] for t in teachers_)} over seeds {', '.join(map(str, seeds))} in "
          f"{args.out}: {total} runs")
    results, count = {}, 0
    for seed in seeds:
        first = teacher_config(base, teachers_[0], seed, args.out).out
        for teacher in teachers_:
            count += 1
            cfg = teacher_config(base, teacher, seed, args.out)
            if compare.is_finished(cfg):
                print(f"[{count}/{total}] teacher {teacher['label']}, seed {seed}: finished in {cfg.out}")
            else:
                print(f"[{count}/{total}] teacher {teacher['label']}, seed {seed}: running in {cfg.out}")
                if cfg.out != first:
                    cfg.first_student = first  # the first student does not depend on the teacher: trained once
                run(cfg)
            results[teacher["label"], seed] = load_result(cfg.out)
        table = write_outputs(summarize(results, teachers_, seeds, base, args, match, ratio), base, args.out)
    print(table)
    print(f"wrote {os.path.join(args.out, 'compare_teachers.md')}, compare_teachers.json and compare_teachers.svg")
    return results


def main(argv=None):
    return compare.run_cli(sys.argv[1:] if argv is None else argv, parse_args, compare_teachers)


if __name__ == "__main__":
    sys.exit(main())
