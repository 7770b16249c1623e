"""llm2llm: targeted, iterative data augmentation for a small student LLM (LLM2LLM, Lee, Wattanawong et al., 2024).

The method, as this file runs it:
  0. sample a small seed set from the task's train split and fine-tune a fresh LoRA student on it;
  1. evaluate the student (greedy) on the seed set and keep the examples it gets wrong;
  2. a teacher LLM writes new examples modelled on exactly those wrong seed examples; augmented examples are
     never sent back as parents, so new data stays anchored to real mistakes;
  3. filter the new examples, add them, fine-tune again from scratch (a fresh adapter on the frozen base),
     evaluate on the test split, and repeat for --iterations rounds, stopping early when no seed example is wrong.

Usage:
    python llm2llm.py --task gsm8k                              # the whole loop (defaults printed at start)
    python llm2llm.py --task sst2 --student PATH --teacher-url http://localhost:8000/v1 --teacher-model M
    python llm2llm.py serve --model PATH_OR_ID [--port 8000]      # OpenAI-compatible teacher server
    python llm2llm.py report runs/gsm8k-...                       # table, report.md, report.svg
    python llm2llm.py compare --task sst2 --seeds 0,1,2 --out runs/cmp   # baselines over seeds (compare.py)
    python llm2llm.py compare-teachers --teacher-a M1 --teacher-b M2 ... # two teachers, compute-matched
    torchrun --nproc-per-node 8 llm2llm.py --task gsm8k ...       # the same loop, data-parallel on 8 GPUs

This file holds the configuration (one dataclass = the command-line flags), the run directory with its resume
logic, and the loop. Loading and decoding are in generate.py, training in train.py, adapters in lora.py, tasks and
teacher prompts in tasks.py and prompts/, the teacher client in teacher.py, the embedded server in serve.py, the
few torch.distributed calls of a torchrun launch in dist.py.
"""
import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

import dist
from generate import DEFAULT_STUDENT, ModelLoadError, generate, is_sharded, load_model, resolve_device
from lora import LoRAError, add_lora, load_adapter, lora_modules, remove_lora, save_adapter
from report import ReportError, render_sampling_table, render_table, write_report
from serve import main as serve_main, make_server, start_background
from tasks import (PROMPTS_DIR, TaskError, check_calculations, fill as tasks_fill, filter_generated, get_task,
                   normalize_text, read_prompt_file, sample_seed, solution_key)
from teacher import BUDGET_SPENT, Teacher, check_reachable
from train import TrainingError, default_precision, parse_micro_batch_tokens, render_prompt, train

# -----------------------------------------------------------------------------
# Configuration: one dataclass; its fields are the command-line flags (dashes there, underscores here).
# Defaults follow the paper where it is explicit: 1 augmentation per wrong seed example, retrain from scratch,
# 10 iterations and a 1% seed set for GSM8K. The rest are ours, chosen for a small LoRA student.

DEFAULT_TEACHER = "Qwen/Qwen2.5-7B-Instruct"


@dataclass
class Config:
    task: str = field(default="gsm8k", metadata={"help": "gsm8k, sst2, trec, snips, casehold, or a path to your own "
                                                 "train .jsonl of {\"input\", \"output\"} rows"})
    data_dir: str = field(default="data", metadata={"help": "folder with <task>/{train,test}.jsonl; missing public "
                                                    "files are downloaded there"})
    test_file: Optional[str] = field(default=None, metadata={"help": "test .jsonl for your own --task file"})
    answer_type: str = field(default="exact", metadata={"help": "your own task: how answers compare "
                                                        "(exact, number, label)"})
    student: str = field(default=DEFAULT_STUDENT, metadata={"help": "student model: Hugging Face id or local folder"})
    teacher_url: Optional[str] = field(default=None, metadata={
        "help": "OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (default: $OPENAI_BASE_URL; if unset, "
                "--teacher-model is served locally by the embedded server)"})
    teacher_model: str = field(default=DEFAULT_TEACHER, metadata={"help": "model name at the teacher endpoint, or "
                                                                  "the id/folder the embedded server loads"})
    teacher_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the "
                                                                     "teacher's API key (never stored)"})
    teacher_workers: int = field(default=8, metadata={"help": "concurrent teacher requests (halved after a timeout)"})
    teacher_timeout: float = field(default=300.0, metadata={"help": "seconds to wait for one teacher reply, time "
                                                            "queued on a busy server included"})
    teacher_temperature: float = field(default=0.7, metadata={"help": "teacher sampling temperature"})
    teacher_max_tokens: int = field(default=1024, metadata={"help": "max tokens per teacher reply"})
    teacher_max_asks: int = field(default=3, metadata={"help": "most times one wrong seed is sent to the teacher "
                                                       "per iteration when its replies are rejected"})
    teacher_budget_tokens: Optional[int] = field(default=None, metadata={"help": "stop asking the teacher once "
                                                                         "the run has used this many tokens"})
    teacher_params: Optional[float] = field(default=None, metadata={
        "help": "the teacher's number of parameters, e.g. 7e9, for teacher_flops = 2 * params * (prompt + completion "
                "tokens) (default: counted from the embedded teacher's config; unknown for an endpoint, and then "
                "FLOPs are not reported)"})
    teacher_price_in: Optional[float] = field(default=None, metadata={"help": "USD per million prompt tokens, for "
                                                                      "teacher_cost_usd (with --teacher-price-out)"})
    teacher_price_out: Optional[float] = field(default=None, metadata={"help": "USD per million completion tokens, "
                                                                       "for teacher_cost_usd"})
    teacher_budget_flops: Optional[float] = field(default=None, metadata={
        "help": "stop asking the teacher once the run has used this many teacher FLOPs (needs the teacher's "
                "parameter count)"})
    teacher_budget_usd: Optional[float] = field(default=None, metadata={
        "help": "stop asking the teacher once the run has spent this many dollars (needs --teacher-price-in/-out)"})
    show_student_answer: bool = field(default=False, metadata={"help": "include the student's wrong answer in the "
                                                               "teacher's message"})
    seed_size: Optional[int] = field(default=None, metadata={"help": "number of seed examples from train"})
    seed_frac: Optional[float] = field(default=None, metadata={"help": "fraction of train used as seed "
                                                               "(default 0.01 when --seed-size is not given)"})
    seed: int = field(default=0, metadata={"help": "random seed for seed sampling, LoRA init, data order, teacher"})
    iterations: int = field(default=10, metadata={"help": "augmentation rounds after the first fine-tune"})
    aug_per_wrong: int = field(default=1, metadata={"help": "new examples asked per wrong seed example"})
    augment: str = field(default="wrong", metadata={"help": "which seed examples the teacher gets as parents: wrong "
                                                    "(LLM2LLM), all, or random (as many as are wrong, drawn from "
                                                    "all seed examples: the same teacher budget)"})
    mistakes: str = field(default="train", metadata={
        "help": "which seed examples count as wrong: train (the trained student answers them wrong, as in the "
                "paper), heldout:K (a student trained without them answers them wrong: the seed set is split into K "
                "folds and K more adapters are trained per iteration), or early:F (wrong after a fraction F of the "
                "fine-tune's optimizer steps, or at its end: one more seed evaluation)"})
    random_parents: Optional[str] = field(default=None, metadata={
        "help": "--augment random: how many seed examples to draw in each iteration, comma-separated, e.g. 12,5 "
                "(compare passes what its llm2llm arm sent; an iteration beyond the list draws none); default: as "
                "many as are wrong in this run"})
    teacher_mode: str = field(default="questions", metadata={
        "help": "questions (LLM2LLM: new problems modelled on each wrong seed), solutions (the teacher solves each "
                "wrong seed problem --samples-per-wrong times; answer-correct solutions become training rows; "
                "GSM8K and your own number/exact tasks), or both"})
    samples_per_wrong: int = field(default=4, metadata={"help": "--teacher-mode solutions/both: solutions sampled "
                                                        "per wrong seed problem (k of coverage@k, diversity@k)"})
    verify: int = field(default=0, metadata={"help": "GSM8K, new questions: the teacher solves each new problem this "
                                             "many times; it is kept only when more than half of them reach the "
                                             "answer it was written with (0: off)"})
    judge_url: Optional[str] = field(default=None, metadata={"help": "OpenAI-compatible base URL of a judge that "
                                                             "rates each answer-correct solution's reasoning "
                                                             "(gives fpr_judge; measurement only)"})
    judge_model: Optional[str] = field(default=None, metadata={"help": "model name at --judge-url"})
    judge_budget_tokens: Optional[int] = field(default=None, metadata={
        "help": "stop asking the judge once the run has used this many judge prompt+completion tokens (cached "
                "replies count; the solutions left are reported as not judged)"})
    epochs: int = field(default=3, metadata={"help": "epochs per fine-tune (raised to reach --min-steps)"})
    min_steps: int = field(default=64, metadata={"help": "fewest optimizer steps per fine-tune: small seed sets get "
                                                 "more epochs, so the student learns them (0: epochs alone)"})
    train_steps: Optional[int] = field(default=None, metadata={"help": "optimizer steps per fine-tune, overriding "
                                                               "--epochs and --min-steps (the data is cycled as needed)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (warmup, then cosine)"})
    batch_size: int = field(default=8, metadata={"help": "rows per optimizer step"})
    micro_batch_tokens: Union[int, str] = field(default="auto", metadata={
        "help": "padded tokens per micro-batch, or auto: on CUDA the most that fit in free memory, on CPU 4096 "
                "(a memory knob; does not change the result)", "type": "micro_batch_tokens"})
    grad_checkpoint: bool = field(default=False, metadata={"help": "recompute each decoder layer in backward "
                                                           "instead of keeping its activations: much less memory "
                                                           "for long rows and 7B students, for one more forward pass"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the student's decoder for training "
                                                   "(row lengths padded to multiples of 64 so shapes repeat)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha/r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch input"})
    max_seq_len: int = field(default=1024, metadata={"help": "longest training row in tokens"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest student answer at evaluation"})
    eval_batch_size: int = field(default=32, metadata={"help": "rows decoded together at evaluation"})
    test_limit: Optional[int] = field(default=None, metadata={"help": "evaluate on the first N test rows only"})
    out: Optional[str] = field(default=None, metadata={"help": "run directory (default runs/<task>-<timestamp>); "
                                                       "rerun with the same --out to resume"})
    continue_training: bool = field(default=False, metadata={"help": "keep training the previous adapter instead "
                                                             "of a fresh one (the paper's ablation)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    precision: Optional[str] = field(default=None, metadata={"help": "fp32, bf16 or fp16 (default: bf16 on CUDA, "
                                                             "fp32 on CPU)"})
    teacher_cache: Optional[str] = field(default=None, metadata={"help": "folder of cached teacher replies "
                                                                 "(default <out>/teacher_cache); runs may share one"})
    force: bool = field(default=False, metadata={"help": "start over in an --out that holds a different run"})
    dist_timeout: float = field(default=1800.0, metadata={
        "help": "under torchrun: seconds a process waits for the others before it stops with an error (a dead or "
                "hung process); rank 0's teacher work keeps the others waiting as long as rank 0 is alive"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard the frozen base model across the "
                                                "processes (FSDP2), for a student too large for one GPU"})


# fields that do not change what a run computes, so a resumed run may differ in them. --device and --precision are
# checked through the precision they resolve to (recorded as precision_used), --teacher-url with a warning.
RESUME_NEUTRAL = {"out", "force", "teacher_workers", "teacher_timeout", "teacher_key_env", "teacher_url", "device",
                  "precision", "teacher_cache", "dist_timeout", "fsdp", "judge_url"}
AUGMENT_CHOICES = ("wrong", "all", "random")
TEACHER_MODES = ("questions", "solutions", "both")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="llm2llm.py", description=__doc__.split("\n\n")[0],
                                     epilog="subcommands: `llm2llm.py serve --model M` runs the OpenAI-compatible "
                                            "teacher server; `llm2llm.py report RUN_DIR` prints a run's report; "
                                            "`llm2llm.py compare --arms ... --seeds ...` compares baselines "
                                            "(see compare.py); `llm2llm.py compare-teachers --teacher-a ... "
                                            "--teacher-b ...` compares two teachers at matched compute "
                                            "(see compare_teachers.py).")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        # Optional[int] -> int; a field with its own parser names it in metadata["type"]
        kind = next((t for t in getattr(f.type, "__args__", ()) if t is not type(None)), f.type)
        kind = {"micro_batch_tokens": micro_batch_tokens_arg}.get(f.metadata.get("type"), kind)
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + f" (default: {f.default})")
    return Config(**vars(parser.parse_args(argv)))


def micro_batch_tokens_arg(text):
    try:
        return parse_micro_batch_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


class RunError(ValueError):
    """A problem the user can fix: the message says what and how."""


# -----------------------------------------------------------------------------
# Small file helpers. Every file the loop writes is written whole (temp file + rename) or appended line by line,
# so a kill at any moment leaves either the old state or the new one, never half a file.

def write_json(path, obj):
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(f"{path}.tmp", path)


def write_jsonl(path, rows):
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(f"{path}.tmp", path)


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the line a kill cut short; it is redone
                    break
    return rows


def append_jsonl(path, rows):
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -----------------------------------------------------------------------------
# Evaluation: greedy answers on a list of rows, saved chunk by chunk so a kill repeats at most one chunk. Chunks
# are fixed slices of the row list, so a resumed evaluation batches exactly as an uninterrupted one. Under torchrun
# each rank decodes its share of every chunk and rank 0 gathers the predictions in input order and writes them.

def evaluate(model, tokenizer, task, rows, path, cfg, desc):
    """The predictions on rank 0 (None on the other ranks)."""
    def progress():  # rank 0: what a previous attempt finished
        if os.path.exists(path):
            return read_jsonl(path), True
        done = read_jsonl(partial) if os.path.exists(partial) else []
        write_jsonl(partial, done)  # drop a line a kill may have cut short
        return done, False

    partial = path + ".partial"
    done, finished = dist.from_rank0(progress)
    if finished:
        return done if dist.is_main() else None
    chunk = cfg.eval_batch_size * 4 * dist.world_size()
    model.eval()  # no LoRA dropout at evaluation, whatever state training or loading left behind
    sharded = is_sharded(model)  # --fsdp: every forward gathers each layer, so all ranks decode the same rows
    bar = tqdm(total=len(rows), initial=len(done), desc=desc, unit="ex", leave=False, disable=not dist.is_main())
    for start in range(len(done) // chunk * chunk, len(rows), chunk):
        if start < len(done):  # an unfinished chunk is redone whole
            done = done[:start]
            if dist.is_main():
                write_jsonl(partial, done)
        batch = rows[start:start + chunk]
        mine = batch if sharded else dist.my_share(batch)
        prompts = [render_prompt(tokenizer, task.prompt(row)) for row in mine]
        texts = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
        predictions = [{"id": row["id"], "prediction": text, "answer": task.extract(text), "gold": task.gold(row),
                        "correct": bool(task.is_correct(text, row))} for row, text in zip(mine, texts)]
        if not sharded:
            shares = dist.gather_to_rank0(predictions)
            predictions = dist.interleave(shares) if dist.is_main() else None
        if dist.is_main():
            append_jsonl(partial, predictions)
            done += predictions
        bar.update(len(batch))
    bar.close()
    if not dist.is_main():
        return None
    os.replace(partial, path)
    return done


# -----------------------------------------------------------------------------
# Augmentation: the teacher writes new examples from SEED examples only: the wrong ones (LLM2LLM), or, for the
# paper's ablations, all of them or a random draw of the same size. A seed whose replies are all rejected is asked
# again (a new sample index, so a new cache key) up to --teacher-max-asks times, then reported.

def choose_parents(cfg, seed_rows, wrong, iteration):
    """The seed examples the teacher writes from, in seed order: the wrong ones; with --augment all every seed example
    (while any is wrong); with --augment random a uniform draw among all seed examples, seeded by the run seed and the
    iteration so a resumed run draws the same ones, of as many as are wrong, or of --random-parents' count for this
    iteration (compare gives the random arm what llm2llm sent, whatever its own student gets wrong)."""
    if cfg.augment == "all":
        return list(seed_rows) if wrong else []
    if cfg.augment == "random":
        counts = parse_random_parents(cfg.random_parents)
        n = len(wrong) if counts is None else counts[iteration] if iteration < len(counts) else 0
        rng = random.Random(f"augment-random-{cfg.seed}-{iteration}")  # a str seed hashes the same in every process
        chosen = {row["id"] for row in rng.sample(seed_rows, min(n, len(seed_rows)))}
        return [row for row in seed_rows if row["id"] in chosen]
    return wrong


def parse_random_parents(text):
    """--random-parents as a list of counts, or None when not given."""
    if text is None:
        return None
    try:
        counts = [int(part) for part in str(text).split(",")]
    except ValueError:
        counts = [-1]
    if any(n < 0 for n in counts):
        raise RunError(f"--random-parents must be comma-separated counts of 0 or more, e.g. 12,5; got {text!r}")
    return counts


def ask_all(client, jobs, what="requests", who="teacher"):
    """(results, usage): every job's reply, and the tokens and replies they used, whether paid now or read from the
    cache, so a resumed run reports the same numbers as an uninterrupted one. Identical jobs are asked, and counted,
    once. A spent budget leaves a job unanswered; any other failure stops the run (finished replies stay cached)."""
    results = client.chat_many(jobs)
    usage = Counter()
    for r in {r["cache_key"]: r for r in results}.values():
        usage.update(prompt=r["prompt_tokens"] or 0, completion=r["completion_tokens"] or 0, replies=1)
    failed = [r["error"] for r in results if r["error"] and r["error"] != BUDGET_SPENT]
    if failed:
        raise RunError(f"the {who} failed on {len(failed)} of {len(jobs)} {what} (first: {failed[0]}). "
                       f"Its finished replies are cached.")
    return results, usage


def augment(task, teacher, parents, predictions, known_rows, test_rows, iteration, cfg):
    need = {row["id"]: cfg.aug_per_wrong for row in parents}
    accepted, rejected = [], []
    usage = Counter()  # over all asks (see ask_all)
    for ask in range(cfg.teacher_max_asks):
        asking = [row for row in parents if need[row["id"]] > 0]
        if not asking or teacher.budget_exhausted:
            break
        # the student's answer is shown only where it is wrong (--augment all/random also send right ones)
        jobs = [{"messages": task.teacher_messages(row, need[row["id"]], predictions[row["id"]]["answer"] if (
            cfg.show_student_answer and not predictions[row["id"]]["correct"]) else None),
            # a new sample index per iteration and ask: the same seed asked again must get a fresh reply, not the
            # cached one from an earlier iteration
            "sample": iteration * cfg.teacher_max_asks + ask} for row in asking]
        results, used = ask_all(teacher, jobs)
        usage.update(used)
        candidates = []
        for row, result in zip(asking, results):
            for choice in result["choices"]:
                parsed, bad = task.parse_reply(choice["text"], truncated=choice["finish_reason"] == "length")
                rejected += [{"parent_id": row["id"], "reason": reason, "text": text} for reason, text in bad]
                candidates += [dict(new, parent_id=row["id"], cache_key=result["cache_key"]) for new in parsed]
        # each parent's quota is applied inside the filter, so an item the teacher wrote beyond what was asked is
        # dropped ("surplus") before it can count as known and knock out another seed's candidate
        kept, bad = filter_generated(task, candidates, known_rows + accepted, test_rows, quota=need)
        rejected += bad
        if cfg.verify and kept:
            kept, bad, verify_usage = verify_questions(task, teacher, kept, iteration, cfg)
            rejected += bad
            usage.update(verify_usage)
        for new in kept:
            parent = new.pop("parent_id")
            cache_key = new.pop("cache_key")
            k = cfg.aug_per_wrong - need[parent]
            need[parent] -= 1
            accepted.append(dict(new, id=f"aug{iteration}-{parent}-{k}", provenance={
                "parent_id": parent, "iteration": iteration, "mode": "question", "teacher_model": cfg.teacher_model,
                "cache_key": cache_key, "ask": ask}))
    unsatisfied = [seed_id for seed_id, n in need.items() if n > 0]
    return accepted, rejected, unsatisfied, usage


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
    return [{"role": "system", "content": tasks_fill(sections["system"], values, path)},
            {"role": "user", "content": tasks_fill(sections["user"], values, path)}]


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


# -----------------------------------------------------------------------------
# Teacher cost. A teacher is paid in compute or in money, and both are linear in tokens: a forward pass costs about
# 2 * params FLOPs per token, prompt and completion alike, and an API bills prompt and completion tokens at their own
# prices. So every cost is a function of the prompt and completion tokens the run used, which the metrics record per
# iteration (cached replies included): a FLOPs or dollar budget stops, and resumes, exactly as the token budget does.

def count_parameters(name):
    """The parameter count of a model folder or Hugging Face id, from its config alone: the model is built on the
    meta device, so no weight is read or allocated; tied weights count once."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def teacher_flops(cfg, prompt_tokens, completion_tokens):
    """2 * params * tokens, or None when the teacher's size is unknown (an endpoint without --teacher-params)."""
    return None if cfg.teacher_params is None else 2 * cfg.teacher_params * (prompt_tokens + completion_tokens)


def teacher_cost_usd(cfg, prompt_tokens, completion_tokens):
    """Dollars at --teacher-price-in/-out (per million tokens), or None without prices."""
    if cfg.teacher_price_in is None:
        return None
    return (prompt_tokens * cfg.teacher_price_in + completion_tokens * cfg.teacher_price_out) / 1e6


def reached(used, budget):
    # a budget a user wrote as the cost of N replies must stop after N, whatever the float rounding of the sums
    return used >= budget * (1 - 1e-9)


def budgets_spent(cfg, prompt_tokens, completion_tokens):
    """The budgets the given usage has reached, as words for the stop message."""
    spent = []
    if cfg.teacher_budget_tokens is not None and prompt_tokens + completion_tokens >= cfg.teacher_budget_tokens:
        spent.append(f"teacher token budget of {cfg.teacher_budget_tokens}")
    if cfg.teacher_budget_flops is not None and reached(teacher_flops(cfg, prompt_tokens, completion_tokens),
                                                        cfg.teacher_budget_flops):
        spent.append(f"teacher FLOPs budget of {cfg.teacher_budget_flops:.4g}")
    if cfg.teacher_budget_usd is not None and reached(teacher_cost_usd(cfg, prompt_tokens, completion_tokens),
                                                      cfg.teacher_budget_usd):
        spent.append(f"teacher budget of ${cfg.teacher_budget_usd:g}")
    return spent


def resolve_teacher_cost(cfg):
    """Check the cost flags and fill in the embedded teacher's parameter count (so config.json records it). Returns
    a line describing the cost accounting, for the start of the run."""
    for name in ("teacher_params", "teacher_price_in", "teacher_price_out", "teacher_budget_flops",
                 "teacher_budget_usd"):
        value = getattr(cfg, name)
        if value is not None and (value != value or value < 0 or (name == "teacher_params" and value == 0)):
            least = "positive" if name == "teacher_params" else "zero or more"
            raise RunError(f"--{name.replace('_', '-')} must be {least}, got {value}")
    if (cfg.teacher_price_in is None) != (cfg.teacher_price_out is None):
        raise RunError("give both --teacher-price-in and --teacher-price-out (USD per million prompt and completion "
                       "tokens; 0 for a side that is free)")
    if cfg.teacher_budget_usd is not None and cfg.teacher_price_in is None:
        raise RunError("--teacher-budget-usd needs the teacher's prices: pass --teacher-price-in and "
                       "--teacher-price-out (USD per million prompt and completion tokens)")
    if cfg.teacher_params is None and not cfg.teacher_url and (cfg.iterations > 0 or cfg.teacher_budget_flops):
        try:  # the embedded teacher: its size is in its config
            cfg.teacher_params = count_parameters(cfg.teacher_model)
        except (OSError, ValueError, KeyError) as e:
            if cfg.teacher_budget_flops is not None:
                raise RunError(f"--teacher-budget-flops: could not count the parameters of the teacher "
                               f"{cfg.teacher_model} ({str(e).splitlines()[0]}); pass --teacher-params N") from None
            print(f"note: could not count the parameters of the teacher {cfg.teacher_model}, so teacher FLOPs are "
                  f"not reported; pass --teacher-params N")
    if cfg.teacher_budget_flops is not None and cfg.teacher_params is None:
        raise RunError("--teacher-budget-flops needs the teacher's parameter count, which an endpoint does not tell: "
                       "pass --teacher-params N (e.g. 7e9)")
    parts = [f"2 x {cfg.teacher_params:.4g} params = {2 * cfg.teacher_params:.4g} FLOPs per token"
             if cfg.teacher_params is not None else "FLOPs not reported (no --teacher-params)"]
    if cfg.teacher_price_in is not None:
        parts.append(f"${cfg.teacher_price_in:g} / ${cfg.teacher_price_out:g} per million prompt / completion tokens")
    budgets = [f"{cfg.teacher_budget_tokens} tokens" if cfg.teacher_budget_tokens is not None else None,
               f"{cfg.teacher_budget_flops:.4g} FLOPs" if cfg.teacher_budget_flops is not None else None,
               f"${cfg.teacher_budget_usd:g}" if cfg.teacher_budget_usd is not None else None]
    budgets = [b for b in budgets if b]
    return "teacher cost: " + "; ".join(parts) + ("; budget " + ", ".join(budgets) if budgets else "")


# -----------------------------------------------------------------------------
# The run directory and resuming

def resolve_precision(cfg, device):
    """The precision training really uses, from --device and --precision."""
    precision = cfg.precision or default_precision(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise RunError(f"--precision {precision}: choose fp32, bf16 or fp16")
    if precision != "fp32" and device.type != "cuda":
        raise RunError(f"--precision {precision} needs a CUDA device; use fp32 on {device.type}")
    return precision


def prompt_hashes(task, cfg=None):
    """sha256 of each prompt file the task sends to the teacher: an edit changes what the teacher is asked."""
    names = [task.prompt_file]
    if cfg is not None and (cfg.teacher_mode != "questions" or cfg.verify):
        names.append(task.prompt_file.replace(".txt", "_solve.txt"))
    if cfg is not None and cfg.judge_url:
        names.append("judge.txt")
    hashes = {}
    for name in names:
        path = PROMPTS_DIR / name
        hashes[f"prompts/{name}"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return hashes


def prepare_run_dir(cfg, recorded):
    """Start the run directory, or resume the run in it. `recorded` holds what the flags do not show but a resumed
    run must keep: the precision they resolve to and the prompt files' hashes."""
    config = {k: v for k, v in asdict(cfg).items() if k != "force"}
    config.update(recorded)
    config_path = os.path.join(cfg.out, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            old = json.load(f)
        # a run started before the teacher's size was recorded had the size counted now (it is derived, not chosen)
        old.setdefault("teacher_params", config["teacher_params"])
        defaults = {f.name: f.default for f in fields(Config)}  # a flag added since that run had its default
        differs = [f"--{k.replace('_', '-')}: {old.get(k, defaults.get(k))!r} then, {v!r} now" for k, v in config.items()
                   if k not in RESUME_NEUTRAL and k not in recorded and old.get(k, defaults.get(k)) != v]
        # runs started before these were recorded have no entry, and nothing to compare with
        if old.get("precision_used", recorded["precision_used"]) != recorded["precision_used"]:
            differs.append(f"precision: {old['precision_used']} then, {recorded['precision_used']} now (from --device "
                           f"{cfg.device} and --precision {cfg.precision or 'default'}); pick a --device and "
                           f"--precision that give {old['precision_used']}")
        for name, digest in recorded["prompt_sha256"].items():
            before = old.get("prompt_sha256", recorded["prompt_sha256"]).get(name, digest)
            if before != digest:
                differs.append(f"{name} was edited since the run started (sha256 {str(before)[:12]} then, "
                               f"{str(digest)[:12]} now); restore it to resume")
        if differs and not cfg.force:
            raise RunError(f"{cfg.out} holds a run with a different configuration:\n  " + "\n  ".join(differs) +
                           "\nUse the same flags to resume it, another --out, or --force to start over.")
        if differs:
            print(f"--force: deleting the previous run in {cfg.out}")
            shutil.rmtree(cfg.out)
        else:
            print(f"resuming the run in {cfg.out}")
            if "teacher_url" in old and old["teacher_url"] != cfg.teacher_url:
                print(f"warning: this run's teacher was {old['teacher_url'] or 'the embedded server'}, now it is "
                      f"{cfg.teacher_url or 'the embedded server'}. Cached replies are reused as {cfg.teacher_model}'s "
                      f"and new ones come from the new endpoint: if it serves another model under that name, the run "
                      f"mixes two teachers. Use another --out to keep them apart.")
    os.makedirs(cfg.out, exist_ok=True)
    write_json(config_path, config)  # no secrets: the API key is read from the environment, never stored


def load_metrics(out):
    """The finished iterations' rows by iteration. A kill while a row is appended can leave a torn last line: it is
    dropped (that iteration is redone, from its saved files) and the file rewritten, so the next row starts on a line
    of its own. A bad line before the last is no kill's doing and is not touched."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    rows, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number:]):
                raise RunError(f"{path}:{number}: not a JSON row. Restore the line, or delete it and every line "
                               f"after it to redo those iterations.") from None
            torn = True
    if torn or (text and not text.endswith("\n")):
        print(f"{path}: repairing a last line cut short by an interruption")
        write_jsonl(path, rows)
    return {m["iteration"]: m for m in rows}


def check_teacher_mode(cfg, task):
    """Refuse, before any training, a --teacher-mode, --verify or judge the task cannot use."""
    if cfg.teacher_mode not in TEACHER_MODES:
        raise RunError(f"--teacher-mode must be one of {', '.join(TEACHER_MODES)}, got {cfg.teacher_mode!r}")
    if cfg.teacher_mode != "questions" and not task.supports_solutions():
        raise RunError(f"--teacher-mode {cfg.teacher_mode} does not apply to task {task.name}: its answers are labels, "
                       f"with no reasoning to sample and grade. Use --teacher-mode questions (the default).")
    if cfg.samples_per_wrong < 1:
        raise RunError(f"--samples-per-wrong must be positive, got {cfg.samples_per_wrong}")
    if cfg.verify < 0:
        raise RunError(f"--verify must be 0 (off) or positive, got {cfg.verify}")
    if cfg.verify and not task.rationale:
        raise RunError(f"--verify checks new GSM8K-style problems by solving them; task {task.name} has none")
    if cfg.verify and cfg.teacher_mode == "solutions":
        raise RunError("--verify checks new questions, and --teacher-mode solutions writes none: use "
                       "--teacher-mode both or questions")
    if cfg.judge_budget_tokens is not None and (cfg.judge_budget_tokens < 1 or not cfg.judge_url):
        raise RunError(f"--judge-budget-tokens must be positive and needs --judge-url, got {cfg.judge_budget_tokens}")
    if bool(cfg.judge_url) != bool(cfg.judge_model):
        raise RunError("a judge needs both --judge-url and --judge-model")
    if cfg.judge_url and cfg.teacher_mode == "questions":
        raise RunError("--judge-url rates sampled solutions: use it with --teacher-mode solutions or both")


def check_teacher(cfg):
    """Fail fast, before any training, on a teacher endpoint that cannot work. The embedded server (no URL) has
    nothing to check until it starts."""
    if not cfg.teacher_url or cfg.iterations == 0:
        return
    try:
        served = check_reachable(cfg.teacher_url, cfg.teacher_key_env)
    except RuntimeError as e:
        raise RunError(str(e))
    if served and cfg.teacher_model not in served:
        # some servers answer any model name with their one model, and provenance would name the wrong author
        print(f"warning: the teacher at {cfg.teacher_url} lists {', '.join(served[:10])}, not --teacher-model "
              f"{cfg.teacher_model}. Some servers answer any name with the model they serve, and this run would "
              f"record {cfg.teacher_model} as the author of their replies: pass one of the listed names.")


class LazyTeacher:
    """The teacher client. Without a teacher URL, the embedded server (and the teacher model) starts only when a
    request the cache cannot answer needs it: a resumed iteration whose replies are all cached loads no teacher."""

    def __init__(self, cfg, device, spent_split):
        self.cfg, self.device, self.server = cfg, device, None
        over = (lambda p, c: bool(budgets_spent(cfg, p, c))) if (
            cfg.teacher_budget_flops is not None or cfg.teacher_budget_usd is not None) else None
        self.client = Teacher(cfg.teacher_url or self._start_embedded, cfg.teacher_model,
                              api_key_env=cfg.teacher_key_env,
                              cache_dir=cfg.teacher_cache or os.path.join(cfg.out, "teacher_cache"),
                              workers=cfg.teacher_workers, timeout=cfg.teacher_timeout,
                              budget_tokens=cfg.teacher_budget_tokens, budget_spent=sum(spent_split),
                              budget_over=over, spent_split=spent_split,
                              temperature=cfg.teacher_temperature, max_tokens=cfg.teacher_max_tokens, seed=cfg.seed)

    def _start_embedded(self):
        cfg = self.cfg
        model, tokenizer = load_model(cfg.teacher_model, self.device, cfg.precision, "teacher")
        self.server = make_server(model, tokenizer, generate, model_name=cfg.teacher_model,
                                  max_batch=max(cfg.teacher_workers, 1) * 2)
        start_background(self.server)
        tqdm.write(f"embedded teacher {cfg.teacher_model} at {self.server.url}")
        return self.server.url

    def close(self):
        if self.server is not None:
            self.server.shutdown()


# -----------------------------------------------------------------------------
# The LLM2LLM loop. Under torchrun every rank runs it; rank 0 alone reads the data, owns the run directory and the
# teacher, and hands the other ranks what they need through dist.from_rank0 (a no-op call in one process).

def run(cfg):
    device = dist.init(resolve_device(cfg.device), cfg.dist_timeout)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if dist.is_main() else devnull):
            return _run(cfg, device)  # only rank 0 prints; errors (stderr) show from every rank
    finally:
        dist.shutdown()


def _run(cfg, device):
    def setup():  # rank 0
        task = get_task(cfg.task, test_file=cfg.test_file, answer_type=cfg.answer_type)
        if cfg.seed_size is None and cfg.seed_frac is None:
            cfg.seed_frac = 0.01
        cfg.out = cfg.out or os.path.join("runs", f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        for name in ("iterations", "aug_per_wrong", "epochs", "teacher_max_asks", "eval_batch_size", "batch_size"):
            if getattr(cfg, name) < (0 if name == "iterations" else 1):
                raise RunError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
        if cfg.train_steps is not None and cfg.train_steps < 1:
            raise RunError(f"--train-steps must be positive, got {cfg.train_steps}")
        if cfg.augment not in AUGMENT_CHOICES:
            raise RunError(f"--augment must be one of {', '.join(AUGMENT_CHOICES)}, got {cfg.augment!r}")
        mode, folds = parse_mistakes(cfg.mistakes)
        if parse_random_parents(cfg.random_parents) is not None and cfg.augment != "random":
            raise RunError("--random-parents sets the size of --augment random's draws: use it with --augment random")
        check_teacher_mode(cfg, task)
        recorded = {"precision_used": resolve_precision(cfg, device), "prompt_sha256": prompt_hashes(task, cfg)}
        cfg.teacher_url = cfg.teacher_url or os.environ.get("OPENAI_BASE_URL")
        check_teacher(cfg)
        cost_line = resolve_teacher_cost(cfg)
        if cfg.judge_url and cfg.iterations:
            try:
                check_reachable(cfg.judge_url, cfg.teacher_key_env)
            except RuntimeError as e:
                raise RunError(f"--judge-url: {e}")
        train_rows = task.load("train", cfg.data_dir)
        test_rows = task.load("test", cfg.data_dir)[:cfg.test_limit]
        if not train_rows:
            raise RunError(f"the {task.name} train split is empty")
        # drawn before the run directory exists, so a seed set that cannot be drawn leaves nothing behind
        fresh_seed = sample_seed(task, train_rows, size=cfg.seed_size, frac=cfg.seed_frac, seed=cfg.seed)
        if mode == "heldout" and folds > len(fresh_seed):
            raise RunError(f"--mistakes {cfg.mistakes}: {folds} folds need at least {folds} seed examples, and the "
                           f"seed set has {len(fresh_seed)}; use fewer folds")
        prepare_run_dir(cfg, recorded)
        print("config:", json.dumps(asdict(cfg)))
        print(f"device {device}, precision {recorded['precision_used']}")
        if cfg.iterations > 0:
            print(cost_line)
        if dist.active():
            print(f"distributed: {dist.describe()}" + (", base model sharded (FSDP2)" if cfg.fsdp else ""))
        elif cfg.fsdp:
            print("--fsdp: one process, nothing to shard (launch with torchrun to shard the model)")

        seed_path = os.path.join(cfg.out, "seed.jsonl")
        if not os.path.exists(seed_path):
            write_jsonl(seed_path, fresh_seed)
        seed_rows = read_jsonl(seed_path)
        print(f"{task.name}: {len(seed_rows)} seed examples of {len(train_rows)} train rows, {len(test_rows)} test "
              f"rows, {cfg.iterations} iterations, " + {
                  "questions": f"{cfg.aug_per_wrong} new example(s) per wrong seed",
                  "solutions": f"{cfg.samples_per_wrong} teacher solutions sampled per wrong seed",
                  "both": f"{cfg.aug_per_wrong} new example(s) and {cfg.samples_per_wrong} teacher solutions "
                          f"sampled per wrong seed"}[cfg.teacher_mode] + (f", each new problem verified by "
                                                                          f"{cfg.verify} solutions" if cfg.verify
                                                                          else "") + f", mistakes: {cfg.mistakes}")
        return task, cfg.out, cfg.seed_frac, cfg.teacher_url, seed_rows, test_rows, load_metrics(cfg.out)

    task, cfg.out, cfg.seed_frac, cfg.teacher_url, seed_rows, test_rows, metrics = dist.from_rank0(setup)
    model, tokenizer = load_student(cfg, device)
    # the budgets count what finished iterations used, so a resumed run stops where an uninterrupted one does
    teacher = LazyTeacher(cfg, device, spent_split=(sum(m.get("teacher_prompt_tokens", 0) for m in metrics.values()),
                                                    sum(m.get("teacher_completion_tokens", 0)
                                                        for m in metrics.values()))) if dist.is_main() else None
    data = seed_rows  # on rank 0; the other ranks receive each iteration's rows


    try:
        for i in range(cfg.iterations + 1):
            step_dir = os.path.join(cfg.out, f"iter_{i:02d}")

            def training_rows():  # rank 0
                os.makedirs(step_dir, exist_ok=True)
                train_path = os.path.join(step_dir, "train.jsonl")
                if not os.path.exists(train_path):
                    write_jsonl(train_path, data)
                return read_jsonl(train_path)

            data = dist.from_rank0(training_rows)
            if i not in metrics:  # a finished iteration (it has its metrics row) is not run again
                # after a budget ran out, the examples it paid for are trained on, and no teacher is asked
                stopped_before = metrics[i - 1].get("stopped") if i > 0 else None
                teacher_round = i < cfg.iterations and not stopped_before
                row = run_iteration(i, cfg, task, model, tokenizer, teacher, seed_rows, data, test_rows, step_dir,
                                    teacher_round, stopped_before)
                metrics[i] = row
                if dist.is_main():
                    append_jsonl(os.path.join(cfg.out, "metrics.jsonl"), [row])
                    print(render_table(list(metrics.values())))
                    if "k" in row:
                        print(render_sampling_table(list(metrics.values())))
            row = metrics[i]
            reason = loop_ends(row, cfg)
            if reason is not None:
                if i < cfg.iterations:
                    print(f"stopping after iteration {i}: {reason}")
                break
            if row.get("stopped"):
                print(f"{row['stopped']}: one more fine-tune, on the {row['n_augmented']} new examples already "
                      f"written, then stop")
            if dist.is_main():
                data = data + read_jsonl(os.path.join(step_dir, "augmented.jsonl"))
    finally:
        if teacher is not None:
            teacher.close()
    if dist.is_main():
        write_report(cfg.out)
        print(f"report: {os.path.join(cfg.out, 'report.md')} and report.svg")
    return cfg.out


def warn_if_undertrained(i, n_right, n_seed, stats, cfg):
    """LLM2LLM's signal is which seed examples a student that has learned its seed set still gets wrong. A student
    that gets most of its own training examples wrong has not learned them, and then "wrong" means nothing."""
    print(f"iteration {i}: the student gets {n_right} of its {n_seed} seed (training) examples right "
          f"after {stats['steps']} optimizer steps, final loss {stats['final_loss']:.3f}")
    if n_right * 2 < n_seed:
        print(f"warning: the student looks undertrained: it gets {n_seed - n_right} of the {n_seed} seed examples it "
              f"was trained on wrong, so most seeds are sent to the teacher and targeting means little. "
              f"Raise --min-steps (now {cfg.min_steps}), --epochs (now {cfg.epochs}) or --lr (now {cfg.lr:g}).")


def load_student(cfg, device):
    """The student on this rank's device. With --fsdp each decoder layer's frozen weights are sharded over the ranks
    (FSDP2); embeddings, final norm and lm_head stay whole on every rank, so the training loss may call lm_head
    directly. Adapters added later stay whole too: FSDP manages only the parameters it was given."""
    if not (cfg.fsdp and dist.active()):
        return load_model(cfg.student, device, cfg.precision, "student")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # every rank first loads the whole model into CPU memory, in the precision it computes in (bf16 on CUDA)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision or default_precision(device))
    model, tokenizer = load_model(cfg.student, torch.device("cpu"), cfg.precision, "student", dtype=low)
    body = getattr(model, "model", None)
    if not isinstance(getattr(body, "layers", None), torch.nn.ModuleList):
        raise RunError(f"--fsdp shards Llama-family students (model.model.layers); {cfg.student} is a "
                       f"{model.config.model_type} model: run it without --fsdp")
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    for layer in body.layers:
        fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=low))  # moves shards to device
    for name, child in body.named_children():
        if name != "layers":
            child.to(device)
    model.lm_head.to(device)
    return model, tokenizer


def attach_adapter(model, adapter_dir, cfg):
    """load_adapter on rank 0; the other ranks add an adapter of the same shape and receive its weights, so they
    never read the run directory."""
    if not dist.active():
        return load_adapter(model, adapter_dir)
    if not lora_modules(model):
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, verbose=False)
    dist.from_rank0(lambda: load_adapter(model, adapter_dir) and None)
    dist.broadcast_tensors([p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)])


def fine_tune(model, tokenizer, task, rows, folder, cfg, seed, label, previous=None, on_step=None, needs=()):
    """Train a fresh adapter on the frozen base ("from scratch"), or continue `previous`, on rows; save it in
    folder/adapter with folder/train_stats.json and return the statistics. A training that finished before (its
    statistics and every file in `needs` are there) is loaded instead; an unfinished one resumes from
    folder/train_state.pt."""
    adapter_dir, stats_path = os.path.join(folder, "adapter"), os.path.join(folder, "train_stats.json")
    checkpoint_path = os.path.join(folder, "train_state.pt")
    remove_lora(model)

    def saved_stats():  # rank 0: the statistics of a training that finished before
        done = [os.path.join(adapter_dir, "adapter_config.json"), stats_path, *needs]
        if all(os.path.exists(path) for path in done):
            with open(stats_path) as f:
                return json.load(f)

    stats = dist.from_rank0(saved_stats)
    if stats is not None:
        attach_adapter(model, adapter_dir, cfg)
        return stats
    torch.manual_seed(cfg.seed)
    add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    if previous is not None:
        attach_adapter(model, previous, cfg)
    print(f"{label}: training on {len(rows)} examples")
    stats = train(model, tokenizer, [(task.prompt(r), task.response(r)) for r in rows], epochs=cfg.epochs,
                  max_steps=cfg.train_steps, lr=cfg.lr, batch_size=cfg.batch_size, min_steps=cfg.min_steps,
                  micro_batch_tokens=cfg.micro_batch_tokens, precision=cfg.precision, seed=seed,
                  max_seq_len=cfg.max_seq_len, checkpoint_path=checkpoint_path, grad_checkpoint=cfg.grad_checkpoint,
                  compile=cfg.compile, on_step=on_step)
    stats = {k: stats[k] for k in ("steps", "epochs", "train_tokens", "train_seconds", "final_loss")}

    def save():  # rank 0: every rank holds the same adapter
        os.makedirs(folder, exist_ok=True)
        save_adapter(model, adapter_dir, base_model_name_or_path=cfg.student)
        write_json(stats_path, stats)
        if os.path.exists(checkpoint_path):
            os.remove(checkpoint_path)

    dist.from_rank0(save)
    return stats


def run_iteration(i, cfg, task, model, tokenizer, teacher, seed_rows, data, test_rows, step_dir, teacher_round,
                  stopped_before):
    mode, arg = parse_mistakes(cfg.mistakes) if teacher_round else ("train", None)

    # 1. fine-tune: a fresh adapter on the frozen base, or the previous one with --continue-training. With
    # --mistakes early:F the seed set is evaluated once on the way, after a fraction F of the optimizer steps
    on_step = early_evaluation(i, arg, model, tokenizer, task, seed_rows, step_dir, cfg) if mode == "early" else None
    previous = os.path.join(os.path.dirname(step_dir), f"iter_{i - 1:02d}", "adapter")
    stats = fine_tune(model, tokenizer, task, data, step_dir, cfg, cfg.seed + i, f"iteration {i}",
                      previous=previous if cfg.continue_training and i > 0 else None, on_step=on_step,
                      needs=[os.path.join(step_dir, "early_eval.json")] if mode == "early" else [])

    # 2. evaluate on the seed set (to find what to augment) and on the test set
    t0 = time.time()
    seed_preds = evaluate(model, tokenizer, task, seed_rows, os.path.join(step_dir, "seed_predictions.jsonl"), cfg,
                          f"iter {i} seed eval")
    test_preds = evaluate(model, tokenizer, task, test_rows, os.path.join(step_dir, "test_predictions.jsonl"), cfg,
                          f"iter {i} test eval") if test_rows else []
    eval_seconds = time.time() - t0

    # 3. the mistakes: the seed examples this student gets wrong, or (--mistakes) those that a student trained
    # without them gets wrong, or those it got wrong part-way through its fine-tune. Searched only where a teacher
    # round follows (not after the last iteration)
    flagged, mistakes_seconds = {}, 0.0
    if mode == "heldout":
        flagged, mistakes_seconds = heldout_mistakes(i, arg, model, tokenizer, task, seed_rows, data, step_dir, cfg)

    # 4. the teacher writes new examples from the parents: the wrong seed examples, or with --augment all of them or
    # a random draw (none after the last iteration, and none once no seed is wrong: the loop stops there). Rank 0
    # alone; the metrics row it returns reaches every rank, so all of them agree on whether the loop goes on
    def ask_teacher():
        by_id = {p["id"]: p for p in seed_preds}
        wrong_train = [row for row in seed_rows if not by_id[row["id"]]["correct"]]
        warn_if_undertrained(i, len(seed_rows) - len(wrong_train), len(seed_rows), stats, cfg)
        found = dict(flagged)
        if mode in ("train", "early"):
            found.update({row["id"]: "wrong at the end of the fine-tune" for row in wrong_train})
        if mode == "early":
            early = read_early_evaluation(step_dir)
            for p in read_jsonl(os.path.join(step_dir, "seed_predictions_early.jsonl")):
                if not p["correct"]:
                    found[p["id"]] = (f"wrong at step {early['step']} of {early['steps']}" + (
                        " and at the end" if p["id"] in found else ""))
            found = {row["id"]: found[row["id"]] for row in seed_rows if row["id"] in found}
        wrong = [row for row in seed_rows if row["id"] in found]
        if teacher_round:
            write_jsonl(os.path.join(step_dir, "mistakes.jsonl"),
                        [{"id": row["id"], "mistakes": cfg.mistakes, "by": found[row["id"]]} for row in wrong])
            if mode != "train":
                print(f"iteration {i}: {len(wrong)} of {len(seed_rows)} seed examples are mistakes under --mistakes "
                      f"{cfg.mistakes} ({len(wrong_train)} wrong after training)")
        accepted, rejected, unsatisfied, stopped, parents, sampling = [], [], [], stopped_before, [], {}
        t0 = time.time()
        usage = Counter()
        if teacher_round and not stopped:
            client = teacher.client
            parents = choose_parents(cfg, seed_rows, wrong, i) if not client.budget_exhausted else []
            if parents:
                requests_before = client.requests
                if cfg.teacher_mode != "solutions":
                    accepted, rejected, unsatisfied, usage = augment(task, client, parents, by_id, data, test_rows, i,
                                                                     cfg)
                if cfg.teacher_mode != "questions" and not client.budget_exhausted:
                    solved, bad, solve_usage, sampling = sample_solutions(task, client, parents, data + accepted, i,
                                                                          cfg)
                    accepted, rejected = accepted + solved, rejected + bad
                    usage.update(solve_usage)
                    print(f"solutions: {len(solved)} kept of {sampling.get('n_solutions', 0)} sampled; " +
                          ", ".join(f"{name} {sampling[name]:.3f}" for name in SAMPLING_SHOWN
                                    if sampling.get(name) is not None))
                print(f"teacher: {len(accepted)} new examples from {len(parents)} seeds ({len(wrong)} wrong, "
                      f"--augment {cfg.augment}), {len(rejected)} rejected, {client.requests - requests_before} "
                      f"HTTP requests for {usage['replies']} replies (the rest from the cache)")
                if unsatisfied:
                    print(f"{len(unsatisfied)} seed example(s) got no acceptable new example after "
                          f"{cfg.teacher_max_asks} asks: {', '.join(unsatisfied[:10])}")
            if client.budget_exhausted:
                stopped = " and ".join(budgets_spent(cfg, client.prompt_used, client.completion_used)) + " spent"
        write_jsonl(os.path.join(step_dir, "rejected.jsonl"), rejected)
        write_jsonl(os.path.join(step_dir, "augmented.jsonl"), accepted)
        teacher_seconds = time.time() - t0
        extra = {"early_step": read_early_evaluation(step_dir)["step"]} if mode == "early" else {}
        if mode == "early":
            mistakes_time = read_early_evaluation(step_dir)["seconds"]
        else:
            mistakes_time = mistakes_seconds
        return {"iteration": i, "train_size": len(data), "n_seed": len(seed_rows), "n_wrong": len(wrong),
                "mistakes": cfg.mistakes if teacher_round else "train", "n_wrong_train": len(wrong_train),
                "n_parents": len(parents), "n_augmented": len(accepted), "n_rejected": len(rejected),
                "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)), "unsatisfied": unsatisfied,
                "seed_acc": 1 - len(wrong_train) / len(seed_rows),
                "test_acc": (sum(p["correct"] for p in test_preds) / len(test_preds)) if test_preds else None,
                "teacher_prompt_tokens": usage["prompt"], "teacher_completion_tokens": usage["completion"],
                "teacher_requests": usage["replies"],
                "teacher_flops": teacher_flops(cfg, usage["prompt"], usage["completion"]),
                "teacher_cost_usd": teacher_cost_usd(cfg, usage["prompt"], usage["completion"]),
                "train_tokens": stats["train_tokens"], "train_seconds": stats["train_seconds"],
                "final_loss": stats["final_loss"], "eval_seconds": eval_seconds, "mistakes_seconds": mistakes_time,
                "teacher_seconds": teacher_seconds, "stopped": stopped, **extra, **sampling}

    return dist.from_rank0(ask_teacher)


# -----------------------------------------------------------------------------
# Finding the mistakes. A student that has learned its seed set gets none of it wrong, and then "the seed examples it
# gets wrong" (the paper's signal, --mistakes train) is empty exactly when training works. Two other readings of
# "what the student has not learned" survive a well-trained student:
#   heldout:K  cross-fitting: the seed set is split into K folds; for each fold an adapter is trained on everything
#              but that fold's seed examples and the teacher examples descended from them, and evaluated on the
#              fold. A seed example is a mistake when the student that did not see it gets it wrong.
#   early:F    training dynamics (the "hard to learn" examples of Dataset Cartography, Swayamdipta et al. 2020, and
#              of Toneva et al. 2019): the seed set is evaluated once when the fine-tune has done a fraction F of its
#              optimizer steps; a mistake is a seed example wrong then or at the end.
# The main student of an iteration is trained on all its rows in every mode, and it is the one scored on the test set.

def parse_mistakes(text):
    """("train", None), ("heldout", K) or ("early", F) from --mistakes."""
    name, _, arg = str(text).partition(":")
    try:
        if name == "train" and not arg:
            return "train", None
        if name == "heldout" and int(arg) >= 2:
            return "heldout", int(arg)
        if name == "early" and 0 < float(arg) < 1:
            return "early", float(arg)
    except ValueError:
        pass
    raise RunError(f"--mistakes {text!r}: use train, heldout:K with K >= 2 folds (e.g. heldout:3), or early:F with "
                   f"0 < F < 1 (e.g. early:0.5)")


def split_folds(task, seed_rows, k, seed, iteration):
    """K folds of seed ids, in seed order: stratified by label (each label's examples are dealt round the folds in a
    shuffled order, the deal carrying on from one label to the next, so fold sizes differ by at most one), seeded by
    the run seed and the iteration."""
    rng = random.Random(f"folds-{seed}-{iteration}")
    groups = {}
    for row in seed_rows:
        groups.setdefault(str(task.stratify_key(row)), []).append(row["id"])
    folds, dealt = [set() for _ in range(k)], 0
    for key in sorted(groups):
        ids = groups[key]
        rng.shuffle(ids)
        for seed_id in ids:
            folds[dealt % k].add(seed_id)
            dealt += 1
    return [[row["id"] for row in seed_rows if row["id"] in fold] for fold in folds]


def without_descendants(rows, held_out):
    """rows less the held-out seed examples and every row descended from one of them, following the provenance's
    parent_id up the chain (a teacher example written from a held-out seed would teach the answer back)."""
    by_id = {row["id"]: row for row in rows}

    def lineage(row):
        seen = set()
        while row is not None and row["id"] not in seen:
            seen.add(row["id"])
            yield row["id"]
            parent = (row.get("provenance") or {}).get("parent_id")
            row = by_id.get(parent, {"id": parent} if parent is not None else None)

    return [row for row in rows if not any(ancestor in held_out for ancestor in lineage(row))]


def heldout_mistakes(i, k, model, tokenizer, task, seed_rows, data, step_dir, cfg):
    """({seed id: how it was flagged}, seconds) for --mistakes heldout:K. Fold j lives in step_dir/folds/fold_j:
    fold.json (its held-out seed ids and training row ids, and once finished its statistics and time), adapter/,
    train_stats.json and predictions.jsonl. A finished fold is read back; a kill during fold j resumes at fold j."""
    folds = split_folds(task, seed_rows, k, cfg.seed, i)
    flagged, seconds = {}, 0.0
    for j, held in enumerate(folds):
        folder = os.path.join(step_dir, "folds", f"fold_{j}")
        summary_path = os.path.join(folder, "fold.json")
        rows = without_descendants(data, set(held))

        def finished():  # rank 0
            if os.path.exists(summary_path):
                with open(summary_path) as f:
                    summary = json.load(f)
                if "eval_seconds" in summary:
                    return summary, read_jsonl(os.path.join(folder, "predictions.jsonl"))
            os.makedirs(folder, exist_ok=True)
            write_json(summary_path, {"heldout_ids": held, "train_ids": [row["id"] for row in rows]})

        done = dist.from_rank0(finished)
        if done is None:
            stats = fine_tune(model, tokenizer, task, rows, folder, cfg, cfg.seed + i,
                              f"iteration {i}, fold {j + 1} of {k} ({len(held)} seed examples held out)")
            t0 = time.time()
            predictions = evaluate(model, tokenizer, task, [row for row in seed_rows if row["id"] in set(held)],
                                   os.path.join(folder, "predictions.jsonl"), cfg, f"iter {i} fold {j + 1} eval")
            summary = {"heldout_ids": held, "train_ids": [row["id"] for row in rows], **stats,
                       "eval_seconds": time.time() - t0}
            if dist.is_main():
                write_json(summary_path, summary)
                done = summary, predictions
        if dist.is_main():
            summary, predictions = done
            seconds += summary["train_seconds"] + summary["eval_seconds"]
            flagged.update({p["id"]: f"wrong when held out (fold {j + 1} of {k})" for p in predictions
                            if not p["correct"]})
    return flagged, seconds


def early_evaluation(i, fraction, model, tokenizer, task, seed_rows, step_dir, cfg):
    """The on_step hook of --mistakes early:F: evaluate the seed set once, after round(F * steps) optimizer steps
    (at least 1), into seed_predictions_early.jsonl, and record the step and time in early_eval.json. A resumed
    training passes that step again and finds the evaluation saved."""
    path = os.path.join(step_dir, "seed_predictions_early.jsonl")

    def on_step(step, total):
        if step != max(1, round(fraction * total)):
            return
        t0 = time.time()
        evaluate(model, tokenizer, task, seed_rows, path, cfg, f"iter {i} seed eval at step {step}")
        info_path = os.path.join(step_dir, "early_eval.json")
        if dist.is_main() and not os.path.exists(info_path):
            write_json(info_path, {"step": step, "steps": total, "fraction": fraction, "seconds": time.time() - t0})

    return on_step


def read_early_evaluation(step_dir):
    with open(os.path.join(step_dir, "early_eval.json")) as f:
        return json.load(f)


def loop_ends(row, cfg):
    """Why the loop stops after this student, or None when another fine-tune follows. compare.py asks the same
    question of a finished run, so "finished" means one thing everywhere."""
    if row["iteration"] >= cfg.iterations:
        return "the last iteration"
    if row.get("stopped"):
        # the examples already paid for are trained on: one more fine-tune, then stop
        return None if row["n_augmented"] else row["stopped"]
    if row.get("n_parents", row["n_wrong"]) == 0:
        return "no seed example is wrong" if row["n_wrong"] == 0 else "no parents were drawn"
    return None


# -----------------------------------------------------------------------------
# Entry point: `python llm2llm.py [flags]` runs the loop; `serve`, `report` and `compare` are subcommands.

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        if argv[:1] == ["serve"]:
            return serve_main(argv[1:])
        if argv[:1] == ["compare-teachers"]:
            from compare_teachers import main as compare_teachers_main  # drives run() too
            return compare_teachers_main(argv[1:])
        if argv[:1] == ["compare"]:
            from compare import main as compare_main  # compare.py drives this file's run(), so it is imported late
            return compare_main(argv[1:])
        if argv[:1] == ["report"]:
            if len(argv) != 2:
                raise RunError("usage: python llm2llm.py report RUN_DIR")
            print(write_report(argv[1]))
            print(f"wrote {os.path.join(argv[1], 'report.md')} and report.svg")
            return 0
        cfg = parse_args(argv)
        run(cfg)
        return 0
    except dist.Rank0Failed:
        return 2  # rank 0 reports the error
    except (RunError, ModelLoadError, TaskError, LoRAError, TrainingError, ReportError, dist.RankLost) as e:
        print(f"error: {e}{resume_hint(cfg, argv)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted{resume_hint(cfg, argv) or '.'}", file=sys.stderr)
        return 130


def resume_hint(cfg, argv):
    """How to pick the run up again, once a run directory exists (naming --out if the user relied on the default)."""
    if cfg is None or not cfg.out or not os.path.exists(os.path.join(cfg.out, "config.json")):
        return ""
    command = "the same command" if "--out" in argv else f"the same command with --out {cfg.out}"
    return f"\nThe run so far is kept in {cfg.out}: rerun {command} to continue where it stopped."


if __name__ == "__main__":
    sys.exit(main())
