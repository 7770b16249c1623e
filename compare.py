"""Compare LLM2LLM with its baselines and ablations over several seeds, with confidence intervals and paired tests.

The method's claim is comparative: targeted augmentation should beat plain fine-tuning, augmenting every seed
example, and augmenting random seed examples at the same teacher budget. This file runs those arms over several
seeds and says how sure the difference is:

    python compare.py --task trec --seeds 0,1,2 --out runs/cmp [--arms ARMS] [any loop flag]

Every arm x seed is an ordinary run directory, DIR/<arm>-seed<k>, made by llm2llm.run() with the loop flags given
plus what the arm changes; read any of them with `llm2llm.py report`. A killed comparison resumes where it
stopped when run again with the same command: finished runs are not touched, an unfinished one resumes as any run
does, and every teacher reply is cached. The first student (iteration 0) is the same in every arm but
finetune-matched (and an arm with --mistakes early, which evaluates the seed set part-way through that fine-tune),
so it is trained once per seed, in the llm2llm run, and shared. Arms (--arms, comma-separated; default
finetune,finetune-matched,llm2llm,random; llm2llm is always run, since the paired tests and three arms' budgets are
measured against it):

    finetune          iteration 0 only: fine-tuning on the seed set
    finetune-matched  iteration 0 only, trained for as many optimizer steps as the final llm2llm student of the same
                      seed (the paper's plain fine-tuning takes fewer steps, because steps grow with the data)
    llm2llm           the loop as configured (--augment wrong)
    all               --augment all: every seed example is sent to the teacher in every iteration
    random            --augment random: in each iteration as many seed examples as llm2llm sent in the same seed and
                      iteration, drawn at random from all seed examples: llm2llm's teacher budget without the
                      targeting (--random-parents; it stops where llm2llm stopped)
    llm2llm:MODE      llm2llm with --mistakes MODE (e.g. llm2llm:train, llm2llm:heldout:3, llm2llm:early:0.5), to
                      compare ways of finding the mistakes side by side; its runs are DIR/llm2llm-MODE-seed<k> with
                      ':' written as '-'. The llm2llm arm keeps the --mistakes given to the comparison
    continue          --continue-training: each iteration keeps training the previous adapter
    oneshot           one augmentation round (--iterations 1) asking for as many teacher examples as llm2llm
                      accepted in all its rounds: --aug-per-wrong = ceil(accepted / the llm2llm first student's wrong
                      seeds), at least 1 (the first student is the same in both arms, so it gets the same seeds wrong)

Output: a table on the terminal, DIR/compare.md, DIR/compare.json and DIR/compare.svg (test accuracy per
iteration, the mean over seeds with its 95% interval as a band). Per arm: the final student's test accuracy, its
mean over seeds with a 95% t-interval across seeds (mean +- t(0.975, n-1) * sd / sqrt(n)), the per-seed values,
teacher examples accepted, teacher tokens, optimizer steps and time. For each other arm, a paired bootstrap of
llm2llm against it on the same test items: the items are resampled (each item keeps its results in every seed),
the statistic is the mean accuracy difference pooled over seeds, and the two-sided p-value is the share of
resamples at least as far from the observed difference as the observed difference is from 0. The resampling is
seeded, so compare.json is the same on every rerun; time is stored apart from the rest ("seconds").
"""
import argparse
import json
import math
import os
import sys
import zlib
from dataclasses import asdict, replace

import torch

import llm2llm
import rundir
from config import RESUME_NEUTRAL, RunError, parse_args as parse_loop_args, parse_mistakes
from cost import count_parameters
from generate import ModelLoadError
from lora import LoRAError
from report import ReportError, md_escape, svg_escape
from rundir import load_metrics, read_jsonl, write_json
from tasks import TaskError
from teacher import TeacherError
from train import TrainingError

REFERENCE = "llm2llm"
MODE_ARM = "llm2llm:"  # llm2llm:MODE is the llm2llm arm with --mistakes MODE
ARMS = ("finetune", "finetune-matched", "llm2llm", "all", "random", "continue", "oneshot")
DEFAULT_ARMS = "finetune,finetune-matched,llm2llm,random"
# loop flags an arm sets itself, so a comparison cannot take them
ARM_FLAGS = ("--augment", "--continue-training", "--seed", "--random-parents", "--first-student")


# -----------------------------------------------------------------------------
# Command line: the comparison's own flags; everything else is a loop flag, parsed by config.parse_args

def add_seed_flags(parser):
    """The flags every comparison has: its seeds and the paired bootstrap (compare-teachers uses them too)."""
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default: 0,1,2)")
    parser.add_argument("--bootstrap-resamples", type=int, default=10000, help="paired bootstrap resamples "
                                                                               "(default: 10000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")


def read_seeds(args, base):
    """The distinct seeds of --seeds, after checking what every comparison needs."""
    try:
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        raise RunError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {args.seeds!r}") from None
    if not seeds:
        raise RunError("--seeds is empty: give at least one seed, e.g. 0,1,2")
    if args.bootstrap_resamples < 1:
        raise RunError(f"--bootstrap-resamples must be positive, got {args.bootstrap_resamples}")
    if base.test_limit == 0:
        raise RunError("--test-limit 0 leaves no test set to compare on")
    return seeds


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="compare.py", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Every other flag is a loop flag (see `llm2llm.py --help`) and applies "
                                            "to every arm.")
    parser.add_argument("--out", required=True, help="comparison directory; the same --out resumes")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, from {', '.join(ARMS)} "
                                                             f"(default: {DEFAULT_ARMS})")
    add_seed_flags(parser)
    args, rest = parser.parse_known_args(argv)
    taken = [flag for flag in ARM_FLAGS if any(a == flag or a.startswith(flag + "=") for a in rest)]
    if taken:
        raise RunError(f"{', '.join(taken)}: set by each arm in a comparison; use --arms and --seeds "
                               f"(and the comparison's own --out)")
    base = parse_loop_args(rest)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS and not a.startswith(MODE_ARM)]
    if unknown or not arms:
        raise RunError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(ARMS)}, "
                               f"or {MODE_ARM}MODE for llm2llm with another --mistakes (e.g. {MODE_ARM}train)")
    for arm in arms:
        if arm.startswith(MODE_ARM):
            parse_mistakes(arm[len(MODE_ARM):])
    same = [a for a in arms if a == MODE_ARM + base.mistakes]
    if same:
        print(f"note: {same[0]} is the {REFERENCE} arm itself (--mistakes {base.mistakes}); running it once")
        arms = [a for a in arms if a not in same]
    if REFERENCE not in arms:
        print(f"note: adding the {REFERENCE} arm: the paired tests and the budgets of finetune-matched and oneshot "
              f"are measured against it")
    arms = [REFERENCE] + [a for a in dict.fromkeys(arms) if a != REFERENCE]  # llm2llm first: others depend on it
    seeds = read_seeds(args, base)
    return base, arms, seeds, args


# -----------------------------------------------------------------------------
# Arms: each is the loop's configuration with a few fields changed. finetune-matched and oneshot take their
# budget from the finished llm2llm run of the same seed.

def arm_config(base, arm, seed, out, reference=None):
    run_dir = os.path.join(out, f"{arm.replace(':', '-')}-seed{seed}")
    # One teacher cache for the whole comparison. Sound, because a cache key holds everything that determines a
    # reply (model, messages, sampling settings, run seed, sample index): a hit is a reply to exactly the request
    # the run would send. Two arms asking the same thing share one reply, so each arm's replies are still
    # draws from the teacher for its own requests, the pair is compared on common teacher randomness, and nothing
    # is paid twice; teacher tokens are still counted per run, cached or not. With a budget (tokens, FLOPs or dollars)
    # each run keeps its own cache and spends its budget alone.
    budget = any(v is not None for v in (base.teacher_budget_tokens, base.teacher_budget_flops,
                                          base.teacher_budget_usd))
    cache = base.teacher_cache or (None if budget else os.path.join(out, "teacher_cache"))
    cfg = replace(base, seed=seed, out=run_dir, teacher_cache=cache)
    if arm in ("finetune", "finetune-matched"):
        cfg.iterations = 0
    if arm == "finetune-matched":
        cfg.train_steps = reference["train_steps"][-1]
    elif arm == "all":
        cfg.augment = "all"
    elif arm == "random":
        # as many parents in each iteration as llm2llm sent in the same seed and iteration: its teacher budget,
        # without the targeting. Where llm2llm stopped, random draws none and stops too
        cfg.augment = "random"
        cfg.random_parents = ",".join(str(m.get("n_parents", m["n_wrong"])) for m in reference["metrics"])
    elif arm.startswith(MODE_ARM):
        cfg.mistakes = arm[len(MODE_ARM):]
    elif arm == "continue":
        cfg.continue_training = True
    elif arm == "oneshot":
        cfg.iterations = min(1, base.iterations)
        first_wrong = reference["metrics"][0]["n_wrong"]
        cfg.aug_per_wrong = max(1, math.ceil(reference["teacher_accepted"] / first_wrong)) if first_wrong else 1
    return cfg


def is_finished(cfg):
    """True when cfg.out holds a finished run of exactly this configuration; then it need not be loaded again."""
    path = os.path.join(cfg.out, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        old = json.load(f)
    if any(old.get(k) != v for k, v in asdict(cfg).items() if k not in RESUME_NEUTRAL and k != "force"):
        return False  # run() resumes it, or says what differs
    metrics = load_metrics(cfg.out)
    return bool(metrics) and llm2llm.loop_ends(metrics[max(metrics)], cfg) is not None


def load_result(run_dir):
    """What the comparison reads from one finished run directory."""
    metrics = [m for _, m in sorted(load_metrics(run_dir).items())]
    last = metrics[-1]
    if last.get("test_acc") is None:
        raise RunError(f"{run_dir} has no test accuracy: a comparison needs a test split")
    steps = []
    for m in metrics:
        with open(os.path.join(run_dir, f"iter_{m['iteration']:02d}", "train_stats.json")) as f:
            steps.append(json.load(f)["steps"])
    predictions = read_jsonl(os.path.join(run_dir, f"iter_{last['iteration']:02d}", "test_predictions.jsonl"))
    return {"metrics": metrics, "test_acc": last["test_acc"], "curve": [m["test_acc"] for m in metrics],
            "teacher_accepted": sum(m["n_augmented"] for m in metrics),
            "teacher_tokens": sum(m["teacher_prompt_tokens"] + m["teacher_completion_tokens"] for m in metrics),
            "train_steps": steps, "correct": {p["id"]: bool(p["correct"]) for p in predictions},
            "seconds": sum(m.get(k) or 0 for m in metrics for k in ("train_seconds", "eval_seconds",
                                                                     "teacher_seconds"))}


# -----------------------------------------------------------------------------
# Statistics

def t_two_sided_mass(t, df):
    """P(|T| <= t) for Student's t with integer df >= 1, in closed form (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        term, total = 1.0, 0.0
        if df > 1:
            total = 1.0
            for k in range(3, df - 1, 2):  # (2*4*...*(k-1)) / (3*5*...*k) cos^(k-1)
                term *= c2 * (k - 1) / k
                total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):  # (1*3*...*(k-1)) / (2*4*...*k) cos^k
        term *= c2 * (k - 1) / k
        total += term
    return s * total


def t_quantile(level, df):
    """The t with P(|T| <= t) = level, by bisection on the closed form (e.g. 0.95, df 2 -> 4.303)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values, level=0.95):
    """(mean, [lo, hi]) with the t-interval across values; the interval is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half]


def paired_bootstrap(a, b, resamples, seed, level=0.95):
    """Paired bootstrap over test items of mean(a) - mean(b).

    a, b: {seed: {item id: correct}} for the same seeds; items present in both arms in every seed are used. An
    item is resampled with its results in every seed, because one item is hard or easy in every seed alike.
    Returns {"n_items", "n_seeds", "a_acc", "b_acc", "diff", "ci", "p"}; p is two-sided:
    (1 + #{resamples with |diff* - diff| >= |diff|}) / (resamples + 1)."""
    seeds = sorted(a)
    items = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not items:
        raise RunError("the arms share no test item to compare on")
    # per item, the difference summed over seeds: integers, so every resample's sum is exact
    d = torch.tensor([sum(int(a[s][i]) - int(b[s][i]) for s in seeds) for i in items], dtype=torch.int64)
    n, denominator = len(items), len(items) * len(seeds)
    observed = int(d.sum())
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, 2 ** 22 // n)
    sums = torch.cat([d[torch.randint(0, n, (min(chunk, resamples - start), n), generator=generator)].sum(1)
                      for start in range(0, resamples, chunk)])
    extreme = int(((sums - observed).abs() >= abs(observed)).sum())
    ordered = sums.sort().values
    tail = (1 - level) / 2
    lo = int(ordered[int(math.floor(tail * (resamples - 1)))])
    hi = int(ordered[int(math.ceil((1 - tail) * (resamples - 1)))])
    return {"n_items": n, "n_seeds": len(seeds),
            "a_acc": sum(int(a[s][i]) for s in seeds for i in items) / denominator,
            "b_acc": sum(int(b[s][i]) for s in seeds for i in items) / denominator,
            "diff": observed / denominator, "ci": [lo / denominator, hi / denominator],
            "p": (1 + extreme) / (resamples + 1)}


# -----------------------------------------------------------------------------
# The summary: compare.json holds every number; the table, compare.md and compare.svg are drawn from it

def summarize(results, arms, seeds, base, args):
    """results: {(arm, seed): load_result(...)} for the finished runs."""
    summary = {"task": base.task, "student": base.student, "teacher_model": base.teacher_model,
               "seeds": seeds, "arms": arms,
               "interval": "95% t-interval across seeds: mean +- t(0.975, n-1) * sd / sqrt(n)",
               "paired_test": "paired bootstrap over test items, pooled across seeds: items resampled with their "
                              "results in every seed, statistic = mean accuracy difference (llm2llm - arm), "
                              "two-sided p = (1 + #{|d* - d| >= |d|}) / (resamples + 1), 95% percentile interval",
               "bootstrap": {"resamples": args.bootstrap_resamples, "seed": args.bootstrap_seed},
               "results": {}, "paired": {}, "seconds": {}}
    for arm in arms:
        done = [s for s in seeds if (arm, s) in results]
        if not done:
            continue
        runs = [results[arm, s] for s in done]
        mean, interval = mean_interval([r["test_acc"] for r in runs])
        # a run that stopped early (no seed example wrong) keeps its last student for the remaining iterations
        length = max(len(r["curve"]) for r in runs)
        curves = [r["curve"] + [r["curve"][-1]] * (length - len(r["curve"])) for r in runs]
        points = [mean_interval([c[i] for c in curves]) for i in range(length)]
        summary["results"][arm] = {
            "seeds": done, "test_acc": [r["test_acc"] for r in runs], "mean": mean, "ci": interval,
            "teacher_accepted": [r["teacher_accepted"] for r in runs],
            "teacher_tokens": [r["teacher_tokens"] for r in runs],
            "final_train_steps": [r["train_steps"][-1] for r in runs],
            "total_train_steps": [sum(r["train_steps"]) for r in runs],
            "curve": {"mean": [m for m, _ in points], "ci": [ci for _, ci in points]}}
        summary["seconds"][arm] = [r["seconds"] for r in runs]
    for arm in arms:
        if arm == REFERENCE:
            continue
        paired_seeds = [s for s in seeds if (REFERENCE, s) in results and (arm, s) in results]
        if paired_seeds:  # the seed is per pair, so adding an arm changes no other arm's numbers
            summary["paired"][arm] = dict(paired_bootstrap(
                {s: results[REFERENCE, s]["correct"] for s in paired_seeds},
                {s: results[arm, s]["correct"] for s in paired_seeds},
                args.bootstrap_resamples, args.bootstrap_seed + zlib.crc32(arm.encode())), seeds=paired_seeds)
    return summary


def _pct(x):
    return f"{100 * x:.1f}%"


def _points(x):
    return f"{100 * x:+.1f}"


def _mean(values):
    return sum(values) / len(values)


def _duration(seconds):
    minutes, secs = divmod(round(seconds), 60)
    return f"{seconds:.1f}s" if seconds < 60 else f"{minutes}m{secs:02d}s" if minutes < 60 else \
        f"{minutes // 60}h{minutes % 60:02d}m"


ARM_COLUMNS = ["arm", "seeds", "test acc", "95% CI", "per seed", "teacher ex", "teacher tok", "steps final/total",
               "time"]
PAIRED_COLUMNS = ["llm2llm vs", "seeds x items", "llm2llm", "arm", "difference (pts)", "95% CI (pts)", "p"]


def table_rows(summary):
    arms = []
    for arm, r in summary["results"].items():
        ci = f"[{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]" if r["ci"] else "-"
        arms.append([arm, str(len(r["seeds"])), _pct(r["mean"]), ci,
                     " ".join(f"{100 * v:.1f}" for v in r["test_acc"]),
                     f"{_mean(r['teacher_accepted']):,.0f}", f"{_mean(r['teacher_tokens']):,.0f}",
                     f"{_mean(r['final_train_steps']):,.0f} / {_mean(r['total_train_steps']):,.0f}",
                     _duration(_mean(summary["seconds"][arm]))])
    paired = [[arm, f"{len(p['seeds'])} x {p['n_items']}", _pct(p["a_acc"]), _pct(p["b_acc"]), _points(p["diff"]),
               f"[{_points(p['ci'][0])}, {_points(p['ci'][1])}]", f"{p['p']:.4f}"]
              for arm, p in summary["paired"].items()]
    return arms, paired


def render_table(summary):
    def block(columns, rows):
        widths = [max(len(r[c]) for r in [columns] + rows) for c in range(len(columns))]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        return [line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows]

    arms, paired = table_rows(summary)
    lines = block(ARM_COLUMNS, arms)
    if paired:
        lines += [""] + block(PAIRED_COLUMNS, paired)
    return "\n".join(lines)


def render_markdown(summary, base):
    arms, paired = table_rows(summary)
    seed_size = f"{base.seed_size} examples" if base.seed_size is not None else f"{base.seed_frac:g} of train"
    lines = ["# llm2llm comparison", "",
             f"- **task**: {md_escape(base.task)}", f"- **student**: {md_escape(base.student)}",
             f"- **teacher model**: {md_escape(base.teacher_model)}", f"- **seed set**: {seed_size}",
             f"- **iterations**: {base.iterations}", f"- **seeds**: {', '.join(map(str, summary['seeds']))}", "",
             "## Arms", "", "| " + " | ".join(ARM_COLUMNS) + " |", "|---" + "|---:" * (len(ARM_COLUMNS) - 1) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in arms]
    lines += ["", "*test acc* is the final student's test accuracy, averaged over seeds, with a " +
              summary["interval"] + "; *per seed* lists each seed's value in the order of *seeds*. "
              "*teacher ex*, *teacher tok*, *steps* and *time* are means per run: teacher examples accepted, "
              "teacher prompt + completion tokens, optimizer steps of the final student / of all students, and "
              "train + eval + teacher time.", ""]
    if paired:
        lines += ["## llm2llm against each arm", "", "| " + " | ".join(PAIRED_COLUMNS) + " |",
                  "|---" + "|---:" * (len(PAIRED_COLUMNS) - 1) + "|"]
        lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in paired]
        lines += ["", f"A {summary['paired_test']}; {summary['bootstrap']['resamples']} resamples. A positive "
                      "difference means llm2llm got more test items right.", ""]
    lines += ["![test accuracy per iteration, mean over seeds with its 95% t-interval](compare.svg)", ""]
    return "\n".join(lines)


COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]


def render_svg(summary, title):
    """Test accuracy per iteration for each arm: the mean over seeds as a line and its 95% t-interval as a band.
    An arm with a single student (finetune, finetune-matched) is a dashed level across the whole chart."""
    width, height = 720, 440
    left, right, top, bottom = 64, 24, 48, 110
    plot_w, plot_h = width - left - right, height - top - bottom
    results = summary["results"]
    last = max([len(r["curve"]["mean"]) - 1 for r in results.values()] + [1])
    pad = 16

    def x(iteration):
        return left + pad + (plot_w - 2 * pad) * iteration / last

    def y(fraction):
        return top + plot_h * (1 - min(max(fraction, 0.0), 1.0))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.1f}" y="28" text-anchor="middle" font-size="16">{svg_escape(title)}</text>']
    for pct in range(0, 101, 20):
        out.append(f'<line x1="{left}" y1="{y(pct / 100):.1f}" x2="{left + plot_w}" y2="{y(pct / 100):.1f}" '
                   f'stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 8}" y="{y(pct / 100) + 4:.1f}" text-anchor="end">{pct}%</text>')
    step = max(1, math.ceil((last + 1) / 12))
    for iteration in range(0, last + 1, step):
        out.append(f'<line x1="{x(iteration):.1f}" y1="{top + plot_h}" x2="{x(iteration):.1f}" '
                   f'y2="{top + plot_h + 5}" stroke="black"/>')
        out.append(f'<text x="{x(iteration):.1f}" y="{top + plot_h + 19}" text-anchor="middle">{iteration}</text>')
    out.append(f'<polyline points="{left},{top} {left},{top + plot_h} {left + plot_w},{top + plot_h}" '
               f'fill="none" stroke="black"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 38}" text-anchor="middle">iteration</text>')
    out.append(f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'test accuracy</text>')
    for k, (arm, r) in enumerate(results.items()):
        color = COLORS[k % len(COLORS)]
        means, cis = r["curve"]["mean"], r["curve"]["ci"]
        single = len(means) == 1
        iterations = [0, last] if single else list(range(len(means)))
        means, cis = (means * 2, cis * 2) if single else (means, cis)
        if all(ci is not None for ci in cis):
            band = [f"{x(i):.1f},{y(ci[1]):.1f}" for i, ci in zip(iterations, cis)] + \
                   [f"{x(i):.1f},{y(ci[0]):.1f}" for i, ci in reversed(list(zip(iterations, cis)))]
            out.append(f'<polygon class="band" points="{" ".join(band)}" fill="{color}" fill-opacity="0.15" '
                       f'stroke="none"/>')
        coords = " ".join(f"{x(i):.1f},{y(m):.1f}" for i, m in zip(iterations, means))
        dash = ' stroke-dasharray="6 4"' if single else ""
        out.append(f'<polyline class="mean" points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}>'
                   f'<title>{svg_escape(arm)}: final {_pct(r["mean"])}</title></polyline>')
        if not single:
            for i, m in zip(iterations, means):
                out.append(f'<circle cx="{x(i):.1f}" cy="{y(m):.1f}" r="3" fill="{color}">'
                           f'<title>{svg_escape(arm)}, iteration {i}: {_pct(m)}</title></circle>')
        lx, ly = left + (k % 4) * 160, height - 50 + (k // 4) * 20
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 30}" y="{ly + 4}">{svg_escape(arm)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_outputs(summary, base, out):
    write_json(os.path.join(out, "compare.json"), summary)
    write_texts(out, {"compare.md": render_markdown(summary, base),
                      "compare.svg": render_svg(summary, f"llm2llm comparison: test accuracy ({base.task})")})
    return render_table(summary)


def write_texts(out, texts):
    """Write {file name: text} into out, each through a .tmp file, so a kill never leaves half a file."""
    for name, text in texts.items():
        with open(os.path.join(out, name + ".tmp"), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


# -----------------------------------------------------------------------------
# The comparison: seed by seed (so a partial comparison holds whole seeds), llm2llm first within a seed

def compare(base, arms, seeds, args, run=None):
    run = run or llm2llm.run
    if base.seed_size is None and base.seed_frac is None:
        base.seed_frac = 0.01  # as run() resolves it, so finished runs are recognised without loading a model
    if base.teacher_params is None and not (base.teacher_url or os.environ.get("OPENAI_BASE_URL")) and \
            base.iterations > 0:
        try:  # the embedded teacher's size, as run() counts it, for the same reason
            base.teacher_params = count_parameters(base.teacher_model)
        except (OSError, ValueError, KeyError):
            pass  # run() says that FLOPs are not reported
    os.makedirs(args.out, exist_ok=True)
    print(f"comparing {', '.join(arms)} over seeds {', '.join(map(str, seeds))} in {args.out}: "
          f"{len(arms) * len(seeds)} runs")
    results, count = {}, 0
    for seed in seeds:
        for arm in arms:
            count += 1
            cfg = arm_config(base, arm, seed, args.out, results.get((REFERENCE, seed)))
            if is_finished(cfg):
                print(f"[{count}/{len(arms) * len(seeds)}] {arm}, seed {seed}: finished in {cfg.out}")
            else:
                print(f"[{count}/{len(arms) * len(seeds)}] {arm}, seed {seed}: running in {cfg.out}")
                if arm not in (REFERENCE, "finetune-matched"):
                    # every other arm starts from llm2llm's first student: the same seed set, flags and seed, and a
                    # fresh adapter at iteration 0. It is trained once per seed and shared (rundir.take_first_student)
                    cfg.first_student = arm_config(base, REFERENCE, seed, args.out).out
                run(cfg)
            results[arm, seed] = load_result(cfg.out)
        table = write_outputs(summarize(results, arms, seeds, base, args), base, args.out)
    print(table)
    print(f"wrote {os.path.join(args.out, 'compare.md')}, compare.json and compare.svg")
    return results


def main(argv=None):
    return run_cli(sys.argv[1:] if argv is None else argv, parse_args, compare)


def run_cli(argv, parse, comparison):
    """The command line of a comparison (compare and compare-teachers): parse, run, and on an error or Ctrl-C say
    that the finished runs are kept and the same command continues."""
    out = None
    try:
        base, runs, seeds, args = parse(argv)
        rundir.lock(args.out)  # one comparison per folder, for the whole comparison (each run locks its own too)
        out = args.out
        try:
            comparison(base, runs, seeds, args)
        finally:
            rundir.unlock(args.out)
        return 0
    except (RunError, ModelLoadError, TaskError, LoRAError, TrainingError, ReportError, TeacherError) as e:
        print(f"error: {e}" + (f"\nThe finished runs are kept in {out}: rerun the same command to continue."
                               if out and os.path.isdir(out) else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted" + (f": the comparison so far is kept in {out}; rerun the same command to continue."
                                 if out and os.path.isdir(out) else "."), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
