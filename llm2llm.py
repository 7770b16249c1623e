"""llm2llm: targeted, iterative data augmentation for a small student LLM (LLM2LLM, Lee, Wattanawong et al., 2024).

    python llm2llm.py --task gsm8k                        # the whole loop; every default is printed at start
    python llm2llm.py --task trec --mistakes heldout:3    # mistakes that a well-trained student still makes
    python llm2llm.py serve --model PATH_OR_ID            # an OpenAI-compatible teacher server (serve.py)
    python llm2llm.py report RUN_DIR                      # a run's table, report.md and report.svg (report.py)
    torchrun --nproc-per-node 8 llm2llm.py --task gsm8k   # the same loop, data-parallel on 8 GPUs
    python compare.py --task trec --seeds 0,1,2 --out DIR # against the baselines, over seeds

The loop, `llm2llm()` just below, is the paper's Algorithm 1; each of its steps is a function after it:
  fine_tune        train a fresh LoRA adapter on the frozen base, on this iteration's rows ("from scratch")
  find_mistakes    the seed examples the student gets wrong (or, --mistakes, would get wrong unseen, or got wrong
                   part-way through its training)
  choose_parents   the seed examples the teacher writes from: the mistakes; never a teacher example
  ask_teacher      new examples modelled on each parent (or, --teacher-mode, the teacher's own solutions)
  keep_new         filter what the teacher wrote: format, duplicates, test-set overlap, arithmetic
  grow_data        add the kept examples to the training rows, and repeat

Everything else lives in its own file: config.py (the flags), rundir.py (the run directory and resuming), train.py
(the training loop), generate.py (loading and decoding), lora.py (adapters), tasks.py and prompts/ (tasks, teacher
prompts, filters), teacher.py (the teacher client), serve.py (the embedded teacher server), solutions.py (sampled
solutions, --verify, the judge), cost.py (teacher FLOPs, dollars, budgets), report.py and dist.py (torchrun).
"""
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter

import torch
from tqdm.auto import tqdm

import dist
import rundir
from config import RunError, parse_args, parse_mistakes, parse_random_parents, resolve_precision
from cost import budgets_spent, teacher_cost_usd, teacher_flops
from generate import ModelLoadError, generate, is_sharded, load_model, resolve_device
from lora import LoRAError, add_lora, remove_lora, save_adapter
from report import ReportError, render_sampling_table, render_table, write_report
from rundir import append_jsonl, plural, read_jsonl, start_run, write_json, write_jsonl
from serve import main as serve_main, make_server, start_background
from solutions import SAMPLING_SHOWN, sample_solutions, verify_questions
from tasks import TaskError, filter_generated
from teacher import Teacher, TeacherError, ask_all
from train import TrainingError, render_prompt, train


# -----------------------------------------------------------------------------
# The loop. Under torchrun every rank runs it; rank 0 alone reads the data, owns the run directory and the teacher,
# and hands the other ranks what they need through dist.from_rank0 (a plain call in one process).

def llm2llm(cfg, device):
    task, seed_rows, test_rows, metrics, resolved = dist.from_rank0(lambda: start_run(cfg, device))
    vars(cfg).update(resolved)  # what rank 0 filled in (--out, the seed fraction, ...), on every rank
    model, tokenizer = dist.load_student(cfg.student, device, resolve_precision(cfg, device), cfg.fsdp)
    # the budgets count what finished iterations used, so a resumed run stops where an uninterrupted one does
    teacher = LazyTeacher(cfg, device, spent=metrics) if dist.is_main() else None
    data = seed_rows  # D_0: the seed set; on rank 0 (the other ranks receive each iteration's rows)
    try:
        for i in range(cfg.iterations + 1):
            step_dir = os.path.join(cfg.out, f"iter_{i:02d}")
            data = dist.from_rank0(lambda: training_rows(step_dir, data))
            if i not in metrics:  # a finished iteration (it has its metrics row) is not run again
                metrics[i] = iteration(i, cfg, task, model, tokenizer, teacher, seed_rows, data, test_rows, step_dir,
                                       metrics.get(i - 1))
                if dist.is_main():
                    append_jsonl(os.path.join(cfg.out, "metrics.jsonl"), [metrics[i]])
                    print(render_table(list(metrics.values())))
                    if "k" in metrics[i]:
                        print(render_sampling_table(list(metrics.values())))
            reason = loop_ends(metrics[i], cfg)
            if reason is not None:
                if i < cfg.iterations:
                    print(f"stopping after iteration {i}: {reason}")
                break
            if metrics[i].get("stopped"):
                print(f"{metrics[i]['stopped']}: one more fine-tune, on the "
                      f"{plural(metrics[i]['n_augmented'], 'new example')} already written, then stop")
            data = grow_data(data, step_dir) if dist.is_main() else data
    finally:
        if teacher is not None:
            teacher.close()
    if dist.is_main():
        write_report(cfg.out)
        print(f"report: {os.path.join(cfg.out, 'report.md')} and report.svg")
    return cfg.out


def iteration(i, cfg, task, model, tokenizer, teacher, seed_rows, data, test_rows, step_dir, previous):
    """One student of the loop: train it, score it, find its mistakes and, where a teacher round follows, have the
    teacher write from them. Returns its metrics row (on every rank)."""
    # no teacher round after the last iteration, nor after a spent budget (its examples are trained on, then stop);
    # and without a teacher round the mistakes are not searched: plain greedy answers describe the last student
    stopped_before = previous.get("stopped") if previous else None
    teacher_round = i < cfg.iterations and not stopped_before
    mode, arg = parse_mistakes(cfg.mistakes) if teacher_round else ("train", None)
    stats = fine_tune(model, tokenizer, task, data, step_dir, cfg, cfg.seed + i, f"iteration {i}",
                      previous=os.path.join(cfg.out, f"iter_{i - 1:02d}", "adapter") if cfg.continue_training and i
                      else None,
                      on_step=early_evaluation(i, arg, model, tokenizer, task, seed_rows, step_dir, cfg)
                      if mode == "early" else None,
                      needs=[os.path.join(step_dir, "early_eval.json")] if mode == "early" else [])
    t0 = time.time()
    seed_preds = evaluate(model, tokenizer, task, seed_rows, os.path.join(step_dir, "seed_predictions.jsonl"), cfg,
                          f"iter {i} seed eval")
    test_preds = evaluate(model, tokenizer, task, test_rows, os.path.join(step_dir, "test_predictions.jsonl"), cfg,
                          f"iter {i} test eval") if test_rows else []
    eval_seconds = time.time() - t0
    found = find_mistakes(i, mode, arg, model, tokenizer, task, seed_rows, seed_preds, data, step_dir, cfg)

    def teach():  # rank 0
        wrong, how, mistakes_seconds, n_wrong_train = found
        warn_if_undertrained(i, len(seed_rows) - n_wrong_train, len(seed_rows), stats, cfg)
        t0, usage, parents, sampling = time.time(), Counter(), [], {}
        accepted, rejected, unsatisfied, stopped = [], [], [], stopped_before
        if teacher_round:
            write_jsonl(os.path.join(step_dir, "mistakes.jsonl"),
                        [{"id": row["id"], "mistakes": cfg.mistakes, "by": how[row["id"]]} for row in wrong])
            client = teacher.client
            parents = choose_parents(cfg, seed_rows, wrong, i) if not client.budget_exhausted else []
            if parents:
                by_id = {p["id"]: p for p in seed_preds}
                accepted, rejected, unsatisfied, usage, sampling = ask_teacher(task, client, parents, by_id, data,
                                                                              test_rows, i, cfg, len(wrong))
            if client.budget_exhausted:
                stopped = " and ".join(budgets_spent(cfg, client.prompt_used, client.completion_used,
                                                     client.prompt_computed_used)) + " spent"
        write_jsonl(os.path.join(step_dir, "rejected.jsonl"), rejected)
        write_jsonl(os.path.join(step_dir, "augmented.jsonl"), accepted)
        return {"iteration": i, "train_size": len(data), "n_seed": len(seed_rows), "n_wrong": len(wrong),
                "mistakes": cfg.mistakes if teacher_round else "train", "n_wrong_train": n_wrong_train,
                "n_parents": len(parents), "n_augmented": len(accepted), "n_rejected": len(rejected),
                "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)), "unsatisfied": unsatisfied,
                "seed_acc": 1 - n_wrong_train / len(seed_rows),
                "test_acc": (sum(p["correct"] for p in test_preds) / len(test_preds)) if test_preds else None,
                "teacher_prompt_tokens": usage["prompt"], "teacher_completion_tokens": usage["completion"],
                "teacher_prompt_tokens_computed": usage["prompt_computed"], "teacher_requests": usage["replies"],
                "teacher_cached_replies": usage["cached"], "teacher_http_requests": usage["http_requests"],
                "teacher_flops": teacher_flops(cfg, usage["prompt_computed"], usage["completion"]),
                "teacher_cost_usd": teacher_cost_usd(cfg, usage["prompt"], usage["completion"]),
                "train_tokens": stats["train_tokens"], "train_seconds": stats["train_seconds"],
                "final_loss": stats["final_loss"], "eval_seconds": eval_seconds,
                "mistakes_seconds": mistakes_seconds, "teacher_seconds": time.time() - t0, "stopped": stopped,
                **({"early_step": read_early_evaluation(step_dir)["step"]} if mode == "early" else {}), **sampling}

    return dist.from_rank0(teach)


def training_rows(step_dir, data):
    """D_i, saved as iter_i/train.jsonl before the student is trained on it, and read back from there on resume."""
    os.makedirs(step_dir, exist_ok=True)
    train_path = os.path.join(step_dir, "train.jsonl")
    if not os.path.exists(train_path):
        write_jsonl(train_path, data)
    return read_jsonl(train_path)


def grow_data(data, step_dir):
    """D_{i+1} = D_i + the teacher examples kept this iteration. Only seed examples are ever parents (choose_parents
    draws from the seed set), so new examples grow the data around real mistakes without drifting from them."""
    return data + read_jsonl(os.path.join(step_dir, "augmented.jsonl"))


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
# Step 1: fine-tune. A fresh adapter every iteration, as the paper found best: training from scratch on the grown data
# beats continuing (the ablation is --continue-training).

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
        dist.attach_adapter(model, adapter_dir, cfg)
        return stats
    torch.manual_seed(cfg.seed)
    add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    if previous is not None:
        try:
            dist.attach_adapter(model, previous, cfg)
        except LoRAError as e:
            raise RunError(f"--continue-training starts from the previous iteration's adapter: {e}. To redo that "
                           f"iteration, delete its folder and every later one, and its metrics.jsonl row and every "
                           f"later one, then rerun.") from None
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



def warn_if_undertrained(i, n_right, n_seed, stats, cfg):
    """LLM2LLM's signal is which seed examples a student that has learned its seed set still gets wrong. A student
    that gets most of its own training examples wrong has not learned them, and then "wrong" means nothing."""
    print(f"iteration {i}: the student gets {n_right} of its {n_seed} seed (training) examples right "
          f"after {stats['steps']} optimizer steps, final loss {stats['final_loss']:.3f}")
    if n_right * 2 < n_seed:
        print(f"warning: the student looks undertrained: it gets {n_seed - n_right} of the {n_seed} seed examples it "
              f"was trained on wrong, so most seeds are sent to the teacher and targeting means little. "
              f"Raise --min-steps (now {cfg.min_steps}), --epochs (now {cfg.epochs}) or --lr (now {cfg.lr:g}).")



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
# Step 2: find the mistakes. A student that has learned its seed set gets none of it wrong, and then "the seed
# examples it gets wrong" (the paper's signal, --mistakes train) is empty exactly when training works. Two other
# readings of "what the student has not learned" survive a well-trained student:
#   heldout:K  cross-fitting: the seed set is split into K folds; for each fold an adapter is trained on everything
#              but that fold's seed examples and the teacher examples descended from them, and evaluated on the
#              fold. A seed example is a mistake when the student that did not see it gets it wrong.
#   early:F    training dynamics (the "hard to learn" examples of Dataset Cartography, Swayamdipta et al. 2020, and
#              of Toneva et al. 2019): the seed set is evaluated once when the fine-tune has done a fraction F of its
#              optimizer steps; a mistake is a seed example wrong then or at the end.
# The main student of an iteration is trained on all its rows in every mode, and it is the one scored on the test set.

def find_mistakes(i, mode, arg, model, tokenizer, task, seed_rows, seed_preds, data, step_dir, cfg):
    """On rank 0: (mistakes in seed order, {seed id: why it is one}, extra seconds spent finding them, the number
    the trained student gets wrong). Every rank trains the heldout folds; the other ranks get None."""
    flagged, seconds = heldout_mistakes(i, arg, model, tokenizer, task, seed_rows, data, step_dir, cfg) if (
        mode == "heldout") else ({}, 0.0)
    if not dist.is_main():
        return None
    wrong_train = {p["id"] for p in seed_preds if not p["correct"]}
    if mode in ("train", "early"):
        flagged = {seed_id: "wrong at the end of the fine-tune" for seed_id in wrong_train}
    if mode == "early":
        early = read_early_evaluation(step_dir)
        seconds = early["seconds"]
        for p in read_jsonl(os.path.join(step_dir, "seed_predictions_early.jsonl")):
            if not p["correct"]:
                flagged[p["id"]] = f"wrong at step {early['step']} of {early['steps']}" + (
                    " and at the end" if p["id"] in flagged else "")
    wrong = [row for row in seed_rows if row["id"] in flagged]
    if mode != "train":
        print(f"iteration {i}: {len(wrong)} of {len(seed_rows)} seed examples are mistakes under --mistakes "
              f"{cfg.mistakes} ({len(wrong_train)} wrong after training)")
    return wrong, flagged, seconds, len(wrong_train)


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



# -----------------------------------------------------------------------------
# Steps 3 to 5: the parents, the teacher, the filter. The teacher writes from SEED examples only: the mistakes
# (LLM2LLM), or, for the paper's ablations, all of them or a random draw of the same size.

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



def ask_teacher(task, client, parents, predictions, data, test_rows, i, cfg, n_wrong):
    """(accepted, rejected, unsatisfied, usage, sampling metrics): new questions modelled on each parent, the
    teacher's own solutions of each parent problem (--teacher-mode solutions, see solutions.py), or both."""
    accepted, rejected, unsatisfied, usage, sampling = [], [], [], Counter(), {}
    if cfg.teacher_mode != "solutions":
        accepted, rejected, unsatisfied, usage = augment(task, client, parents, predictions, data, test_rows, i, cfg)
    if cfg.teacher_mode != "questions" and not client.budget_exhausted:
        solved, bad, solve_usage, sampling = sample_solutions(task, client, parents, data + accepted, i, cfg)
        accepted, rejected = accepted + solved, rejected + bad
        usage.update(solve_usage)
        print(f"solutions: {len(solved)} kept of {sampling.get('n_solutions', 0)} sampled; " +
              ", ".join(f"{name} {sampling[name]:.3f}" for name in SAMPLING_SHOWN if sampling.get(name) is not None))
    print(f"teacher: {plural(len(accepted), 'new example')} from {plural(len(parents), 'seed')} ({n_wrong} wrong, "
          f"--augment {cfg.augment}), {len(rejected)} rejected; {plural(usage['replies'], 'teacher reply')} used, "
          f"{usage['cached']} from the cache, {plural(usage['http_requests'], 'HTTP request')} sent".replace(
              "replys", "replies"))
    if unsatisfied:
        print(f"{plural(len(unsatisfied), 'seed example')} got no acceptable new example after "
              f"{plural(cfg.teacher_max_asks, 'ask')}: {', '.join(unsatisfied[:10])}")
    return accepted, rejected, unsatisfied, usage, sampling


def augment(task, teacher, parents, predictions, known_rows, test_rows, iteration, cfg):
    """(accepted, rejected, unsatisfied parent ids, usage): --aug-per-wrong new examples modelled on each parent. A
    parent whose replies are all rejected is asked again (a new sample index, so a new cache key) up to
    --teacher-max-asks times, then reported as unsatisfied."""
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
        kept, bad, verify_usage = keep_new(task, teacher, candidates, known_rows + accepted, test_rows, need,
                                           iteration, cfg)
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



def keep_new(task, client, candidates, known_rows, test_rows, quota, iteration, cfg):
    """(kept, rejected, usage): the teacher's rows that are well-formed, new (not a duplicate or near-duplicate of a
    training row or an earlier candidate), not a test row (decontamination) and, for GSM8K, right in their arithmetic;
    with --verify, also solved to their own answer by most of k teacher solutions. Each parent's quota is applied
    inside the filter, so an item written beyond what was asked is dropped ("surplus") before it can count as known
    and knock out another parent's candidate."""
    kept, rejected = filter_generated(task, candidates, known_rows, test_rows, quota=quota)
    if not (cfg.verify and kept):
        return kept, rejected, Counter()
    kept, unverified, usage = verify_questions(task, client, kept, iteration, cfg)
    return kept, rejected + unverified, usage


class LazyTeacher:
    """The teacher client. Without a teacher URL, the embedded server (and the teacher model) starts only when a
    request the cache cannot answer needs it: a resumed iteration whose replies are all cached loads no teacher."""

    def __init__(self, cfg, device, spent):
        """spent: the finished iterations' metrics rows, whose teacher tokens count against the budgets."""
        self.cfg, self.device, self.server = cfg, device, None
        spent_split = (sum(m.get("teacher_prompt_tokens", 0) for m in spent.values()),
                       sum(m.get("teacher_completion_tokens", 0) for m in spent.values()),
                       sum(m.get("teacher_prompt_tokens_computed", m.get("teacher_prompt_tokens", 0))
                           for m in spent.values()))
        over = (lambda p, c, pc: bool(budgets_spent(cfg, p, c, pc))) if (
            cfg.teacher_budget_flops is not None or cfg.teacher_budget_usd is not None) else None
        self.client = Teacher(cfg.teacher_url or self._start_embedded, cfg.teacher_model,
                              api_key_env=cfg.teacher_key_env,
                              cache_dir=cfg.teacher_cache or os.path.join(cfg.out, "teacher_cache"),
                              workers=cfg.teacher_workers, timeout=cfg.teacher_timeout,
                              budget_tokens=cfg.teacher_budget_tokens, budget_spent=sum(spent_split[:2]),
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
# Entry point: `python llm2llm.py [flags]` runs the loop; `serve` and `report` are subcommands.

def run(cfg):
    """Run the loop as configured (the entry point of compare.py too). Returns the run directory."""
    rundir.opened.clear()  # what this run opens decides what an error message may offer to resume
    device = dist.init(resolve_device(cfg.device), cfg.dist_timeout)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if dist.is_main() else devnull):
            return llm2llm(cfg, device)  # only rank 0 prints; errors (stderr) show from every rank
    finally:
        if dist.is_main():
            rundir.unlock(cfg.out)
        dist.shutdown()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        if argv[:1] == ["serve"]:
            return serve_main(argv[1:])
        if argv[:1] == ["report"]:
            if len(argv) != 2:
                raise RunError("usage: python llm2llm.py report RUN_DIR")
            print(write_report(argv[1]))
            print(f"wrote {os.path.join(argv[1], 'report.md')} and report.svg")
            return 0
        if argv[:1] in (["compare"], ["compare-teachers"]):  # they build on this file, which never imports them
            script = argv[0].replace("-", "_") + ".py"
            raise RunError(f"comparisons are their own command: python {script} {' '.join(argv[1:])}")
        cfg = parse_args(argv)
        run(cfg)
        return 0
    except dist.Rank0Failed:
        return 2  # rank 0 reports the error
    except (TeacherError, dist.RankLost) as e:  # the teacher or another process failed: a rerun may well get past it
        print(f"error: {e}{resume_hint(cfg, argv, True)}", file=sys.stderr)
        return 2
    except (RunError, ModelLoadError, TaskError, LoRAError, TrainingError, ReportError) as e:
        print(f"error: {e}{resume_hint(cfg, argv, False)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted{resume_hint(cfg, argv, True) or '.'}", file=sys.stderr)
        return 130


def resume_hint(cfg, argv, rerun_continues):
    """Where the run so far is kept, once this process has opened its run directory; and how to pick it up again
    when rerunning can continue (after an interruption or a teacher failure, not after an error that a rerun would
    meet again)."""
    if cfg is None or not cfg.out or os.path.abspath(cfg.out) not in rundir.opened:
        return ""
    if not rerun_continues:
        return f"\nThe run so far is kept in {cfg.out}; fix the cause, then rerun to continue where it stopped."
    command = "the same command" if "--out" in argv else f"the same command with --out {cfg.out}"
    return f"\nThe run so far is kept in {cfg.out}: rerun {command} to continue where it stopped."

if __name__ == "__main__":
    sys.exit(main())
