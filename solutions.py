"""Teacher-written solutions, --verify and the judge: what the teacher's data is worth beyond new questions.

  - --teacher-mode solutions/both (after Bansal et al. 2024): the teacher solves each parent problem k times, and
    its answer-correct solutions become training rows; coverage@k, diversity@k and a false-positive estimate
    describe that data;
  - --verify k: a new GSM8K problem is kept only when most of k teacher solutions reach the answer it was written
    with;
  - --judge-url: a judge model rates each answer-correct solution's reasoning (fpr_judge), for measurement only.

    from solutions import sample_solutions
    accepted, rejected, usage, metrics = sample_solutions(task, teacher_client, parents, known_rows, 0, cfg)
"""
import os
import re

from rundir import load_metrics
from tasks import (PROMPTS_DIR, TaskError, check_calculations, fill, normalize_text, read_prompt_file,
                   solution_key)
from teacher import Teacher, ask_all

# -----------------------------------------------------------------------------
# --verify

def verify_questions(task, teacher, kept, iteration, cfg):
    """(verified, rejected, usage): the teacher solves each new problem --verify times; a problem is kept only when
    more than half of those solutions reach the answer it was written with (a problem whose own answer is wrong, or
    that is ambiguous, rarely gets a majority)."""
    jobs = [{"messages": task.solve_messages(new), "n": cfg.verify, "sample": iteration} for new in kept]
    results, usage = ask_all(teacher, jobs, "verification requests")
    verified, rejected = [], []
    for new, result in zip(kept, results):
        votes = sum(task.read_number(task.parse_solution(c["text"])[0]) == task.answer_value(new)
                    for c in result["choices"])
        if result["choices"] and 2 * votes > cfg.verify:
            verified.append(new)
        else:
            rejected.append({"parent_id": new.get("parent_id"), "reason": "failed_verification",
                             "text": task.format_item(new), "votes": f"{votes}/{len(result['choices'])}"})
    return verified, rejected, usage


# -----------------------------------------------------------------------------
# Solutions (--teacher-mode solutions/both, after Bansal et al. 2024, "Smaller, Weaker, Yet Better"): the teacher
# solves each parent problem k times. A solution whose final answer is the gold one is "answer-correct"; it becomes a
# training row (the seed question, the teacher's solution) unless it shows no working, has a wrong calculator note,
# or repeats a known solution. The three numbers that describe such data are measured on the way:
#   coverage@k   share of problems with at least one answer-correct solution among their k;
#   diversity@k  mean number of distinct answer-correct solutions per problem (whitespace and number formatting
#                normalised);
#   fpr_estimate share of answer-correct solutions with a wrong <<a*b=c>> note: right answer, wrong working. A
#                lower bound, since reasoning can be wrong without a note showing it; an optional judge model
#                (--judge-url) rates each answer-correct solution's reasoning for fpr_judge.

def sample_solutions(task, teacher, parents, known_rows, iteration, cfg):
    """(accepted rows, rejected, usage, metrics) for one iteration's parents."""
    k = cfg.samples_per_wrong
    jobs = [{"messages": task.solve_messages(row), "n": k, "sample": iteration} for row in parents]
    results, usage = ask_all(teacher, jobs, "solution requests")
    seen = {(normalize_text(task.prompt(r)), solution_key(task.response(r))) for r in known_rows}
    accepted, rejected, correct = [], [], []
    problems = covered = unique_total = calc_failures = sampled = 0
    for row, result in zip(parents, results):
        if not result["choices"]:  # the budget ran out before this problem was asked
            continue
        problems += 1
        unique = set()
        for j, choice in enumerate(result["choices"]):
            sampled += 1
            text, reason = task.parse_solution(choice["text"], truncated=choice["finish_reason"] == "length")
            if reason is None and task.is_correct(text, row):
                correct.append((row, text))
                unique.add(solution_key(text))
                calc_failures += check_calculations(text) is not None
            if reason is None:
                reason = task.check_solution(text, row)
            key = (normalize_text(task.prompt(row)), solution_key(text))
            if reason is None and key in seen:
                reason = "duplicate"
            if reason:
                rejected.append({"parent_id": row["id"], "reason": f"solution_{reason}", "text": text})
                continue
            seen.add(key)
            accepted.append({**{name: row[name] for name in task.input_fields}, task.target_field: text,
                             "id": f"sol{iteration}-{row['id']}-{j}", "provenance": {
                                 "parent_id": row["id"], "iteration": iteration, "mode": "solution",
                                 "teacher_model": cfg.teacher_model, "cache_key": result["cache_key"], "sample": j}})
        covered += bool(unique)
        unique_total += len(unique)
    metrics = {}
    if problems:
        metrics = {"k": k, "n_solutions": sampled, "n_answer_correct": len(correct),
                   "coverage_at_k": covered / problems, "diversity_at_k": unique_total / problems,
                   "fpr_estimate": calc_failures / len(correct) if correct else None}
        if cfg.judge_url:
            metrics.update(judge_solutions(task, correct, cfg))
    return accepted, rejected, usage, metrics


# -----------------------------------------------------------------------------
# The judge: a second model rates the reasoning of answer-correct solutions, for fpr_judge

SAMPLING_SHOWN = ("coverage_at_k", "diversity_at_k", "fpr_estimate", "fpr_judge")
VERDICT_RE = re.compile(r"[*_`\s]*verdict[*_`\s]*:[*_`\s]*(sound|unsound)[*_`.\s]*", re.I)


def parse_verdict(text):
    """True (sound), False (unsound) or None: the reply's last non-empty line must be "VERDICT: SOUND" or
    "VERDICT: UNSOUND" (markdown emphasis and case aside); anything else is not counted."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    match = VERDICT_RE.fullmatch(lines[-1]) if lines else None
    return None if match is None else match[1].lower() == "sound"


def judge_messages(task, row, solution):
    path = PROMPTS_DIR / "judge.txt"
    if not path.exists():
        raise TaskError(f"{path}: prompt file missing; restore it from the repository")
    sections = read_prompt_file(str(path))
    values = {"problem": task.prompt(row), "solution": solution, "gold": task.gold(row)}
    return [{"role": "system", "content": fill(sections["system"], values, path)},
            {"role": "user", "content": fill(sections["user"], values, path)}]


def judge_solutions(task, correct, cfg):
    """fpr_judge and the judge's counts and tokens, for the answer-correct solutions [(seed row, solution)]. The
    judge has its own client and cache (<out>/judge_cache), so a resumed run asks it nothing twice."""
    # the judge's budget, like the teacher's, counts what finished iterations used, so a resumed run stops where an
    # uninterrupted one does (this iteration's cached replies count again as they are read)
    spent = sum(m.get("judge_prompt_tokens", 0) + m.get("judge_completion_tokens", 0)
                for m in load_metrics(cfg.out).values())
    judge = Teacher(cfg.judge_url, cfg.judge_model, api_key_env=cfg.teacher_key_env,
                    cache_dir=os.path.join(cfg.out, "judge_cache"), workers=cfg.teacher_workers,
                    timeout=cfg.teacher_timeout, temperature=0.0, max_tokens=cfg.teacher_max_tokens, seed=cfg.seed,
                    budget_tokens=cfg.judge_budget_tokens, budget_spent=spent)
    results, usage = ask_all(judge, [{"messages": judge_messages(task, row, text)} for row, text in correct],
                             who="judge")
    answered = [r for r in results if not r["error"]]
    if len(answered) < len(results):
        print(f"judge: token budget of {cfg.judge_budget_tokens} spent; {len(results) - len(answered)} "
              f"answer-correct solutions not judged")
    verdicts = [parse_verdict(r["choices"][0]["text"]) for r in answered]
    sound, unsound = verdicts.count(True), verdicts.count(False)
    return {"judge_sound": sound, "judge_unsound": unsound, "judge_unparseable": verdicts.count(None),
            "judge_unjudged": len(results) - len(answered),
            "fpr_judge": unsound / (sound + unsound) if sound + unsound else None,
            "judge_prompt_tokens": usage["prompt"], "judge_completion_tokens": usage["completion"]}
