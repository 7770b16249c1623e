"""The configuration of an llm2llm run: one dataclass whose fields are the command-line flags.

Every field is a flag (dashes on the command line, underscores in code) with its help text and its group in
`python llm2llm.py --help`. The resolved configuration is saved as config.json in every run directory, and a
resumed run must match it. This file also checks the flags that can be checked before anything is loaded, and
parses the few flags that carry a small language of their own (--mistakes, --random-parents, --micro-batch-tokens).

    from config import Config, parse_args
    cfg = parse_args(["--task", "trec", "--mistakes", "heldout:3"])
"""
import argparse
from dataclasses import dataclass, field, fields
from typing import Optional, Union

from generate import DEFAULT_STUDENT
from train import default_precision, parse_micro_batch_tokens

DEFAULT_TEACHER = "Qwen/Qwen2.5-7B-Instruct"
AUGMENT_CHOICES = ("wrong", "all", "random")
TEACHER_MODES = ("questions", "solutions", "both")
SUBCOMMANDS = ("serve: an OpenAI-compatible server for a local model (python llm2llm.py serve --model M); "
               "report: a run's table, report.md and report.svg (python llm2llm.py report RUN_DIR). "
               "Comparisons are their own commands: python compare.py (baselines over seeds) and "
               "python compare_teachers.py (two teachers at matched compute).")


class RunError(ValueError):
    """A problem the user can fix: the message says what and how."""


def flag(default, group, help, parse=None):
    """A Config field: its default, its --help group and text, and optionally a parser of its own."""
    return field(default=default, metadata={"group": group, "help": help, "parse": parse})


def micro_batch_tokens_arg(text):
    try:
        return parse_micro_batch_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


# -----------------------------------------------------------------------------
# The flags. Defaults follow the paper where it is explicit: 1 augmentation per wrong seed example, retraining from
# scratch, 10 iterations and a 1% seed set for GSM8K. The rest are ours, chosen for a small LoRA student.

DATA, STUDENT, TEACHER, COST, LOOP, RUN_DIR, DISTRIBUTED = (
    "data", "student and training", "teacher", "teacher cost and budgets", "the loop", "run directory",
    "distributed (torchrun)")


@dataclass
class Config:
    # data
    task: str = flag("gsm8k", DATA, "gsm8k, sst2, trec, snips, casehold, or a path to your own train .jsonl of "
                                    "{\"input\", \"output\"} rows")
    data_dir: str = flag("data", DATA, "folder with <task>/{train,test}.jsonl; missing public files are downloaded "
                                       "there")
    test_file: Optional[str] = flag(None, DATA, "test .jsonl for your own --task file")
    answer_type: str = flag("exact", DATA, "your own task: how answers compare (exact, number, label)")
    seed_size: Optional[int] = flag(None, DATA, "number of seed examples drawn from train")
    seed_frac: Optional[float] = flag(None, DATA, "fraction of train drawn as the seed set (default: 0.01 when "
                                                  "--seed-size is not given)")
    test_limit: Optional[int] = flag(None, DATA, "evaluate on the first N test rows only (default: all)")

    # the student and its training
    student: str = flag(DEFAULT_STUDENT, STUDENT, "student model: Hugging Face id or local folder")
    epochs: int = flag(3, STUDENT, "epochs per fine-tune (raised to reach --min-steps)")
    min_steps: int = flag(64, STUDENT, "fewest optimizer steps per fine-tune: small seed sets get more epochs, so "
                                       "the student learns them (0: epochs alone)")
    train_steps: Optional[int] = flag(None, STUDENT, "optimizer steps per fine-tune, overriding --epochs and "
                                                     "--min-steps (the data is cycled as needed)")
    lr: float = flag(1e-3, STUDENT, "peak learning rate (warmup, then cosine)")
    batch_size: int = flag(8, STUDENT, "rows per optimizer step")
    micro_batch_tokens: Union[int, str] = flag(
        "auto", STUDENT, "padded tokens per micro-batch, or auto: on CUDA the most that fit in free memory, on CPU "
                         "4096 (a memory knob; does not change the result)", parse=micro_batch_tokens_arg)
    grad_checkpoint: bool = flag(False, STUDENT, "recompute each decoder layer in backward instead of keeping its "
                                                 "activations: much less memory for long rows and 7B students, for "
                                                 "one more forward pass")
    compile: bool = flag(False, STUDENT, "torch.compile the student's decoder for training (row lengths padded to "
                                         "multiples of 64 so shapes repeat)")
    lora_r: int = flag(8, STUDENT, "LoRA rank")
    lora_alpha: int = flag(16, STUDENT, "LoRA alpha (scaling alpha/r)")
    lora_dropout: float = flag(0.05, STUDENT, "dropout on the LoRA branch input")
    max_seq_len: int = flag(1024, STUDENT, "longest training row in tokens")
    max_new_tokens: int = flag(256, STUDENT, "longest student answer at evaluation")
    eval_batch_size: int = flag(32, STUDENT, "rows decoded together at evaluation")
    continue_training: bool = flag(False, STUDENT, "keep training the previous adapter instead of a fresh one (the "
                                                   "paper's ablation)")
    device: str = flag("auto", STUDENT, "auto, cpu, cuda, cuda:1, ...")
    precision: Optional[str] = flag(None, STUDENT, "fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")

    # the teacher
    teacher_url: Optional[str] = flag(None, TEACHER, "OpenAI-compatible base URL, e.g. https://api.openai.com/v1 "
                                                     "(default: $OPENAI_BASE_URL; if unset, --teacher-model is "
                                                     "served locally by the embedded server)")
    teacher_model: str = flag(DEFAULT_TEACHER, TEACHER, "model name at the teacher endpoint, or the id/folder the "
                                                        "embedded server loads")
    teacher_key_env: str = flag("OPENAI_API_KEY", TEACHER, "environment variable holding the teacher's API key "
                                                           "(never stored)")
    teacher_workers: int = flag(8, TEACHER, "concurrent teacher requests (halved after a timeout)")
    teacher_timeout: float = flag(300.0, TEACHER, "seconds to wait for one teacher reply, time queued on a busy "
                                                  "server included")
    teacher_temperature: float = flag(0.7, TEACHER, "teacher sampling temperature")
    teacher_max_tokens: int = flag(1024, TEACHER, "max tokens per teacher reply")
    teacher_max_asks: int = flag(3, TEACHER, "most times one parent is sent to the teacher per iteration when its "
                                             "replies are rejected")
    show_student_answer: bool = flag(False, TEACHER, "include the student's wrong answer in the teacher's message")
    teacher_mode: str = flag("questions", TEACHER, "questions (LLM2LLM: new problems modelled on each parent), "
                                                   "solutions (the teacher solves each parent problem "
                                                   "--samples-per-wrong times; answer-correct solutions become "
                                                   "training rows; GSM8K and your own number/exact tasks), or both")
    samples_per_wrong: int = flag(4, TEACHER, "--teacher-mode solutions/both: solutions sampled per parent problem "
                                              "(k of coverage@k, diversity@k)")
    verify: int = flag(0, TEACHER, "GSM8K, new questions: the teacher solves each new problem this many times; it "
                                   "is kept only when more than half of them reach the answer it was written with "
                                   "(0: off)")
    judge_url: Optional[str] = flag(None, TEACHER, "OpenAI-compatible base URL of a judge that rates each "
                                                   "answer-correct solution's reasoning (gives fpr_judge; "
                                                   "measurement only)")
    judge_model: Optional[str] = flag(None, TEACHER, "model name at --judge-url")

    # teacher cost and budgets
    teacher_params: Optional[float] = flag(None, COST, "the teacher's number of parameters, e.g. 7e9, for "
                                                       "teacher_flops = 2 * params * tokens (default: counted from "
                                                       "the embedded teacher's config; unknown for an endpoint, and "
                                                       "then FLOPs are not reported)")
    teacher_price_in: Optional[float] = flag(None, COST, "USD per million prompt tokens, for teacher_cost_usd (with "
                                                         "--teacher-price-out)")
    teacher_price_out: Optional[float] = flag(None, COST, "USD per million completion tokens, for teacher_cost_usd")
    teacher_budget_tokens: Optional[int] = flag(None, COST, "stop asking the teacher once the run has used this "
                                                            "many tokens")
    teacher_budget_flops: Optional[float] = flag(None, COST, "stop asking the teacher once the run has used this "
                                                             "many teacher FLOPs (needs the teacher's parameter "
                                                             "count)")
    teacher_budget_usd: Optional[float] = flag(None, COST, "stop asking the teacher once the run has spent this "
                                                           "many dollars (needs --teacher-price-in/-out)")
    judge_budget_tokens: Optional[int] = flag(None, COST, "stop asking the judge once the run has used this many "
                                                          "judge tokens (cached replies count; the solutions left "
                                                          "are reported as not judged)")

    # the loop
    seed: int = flag(0, LOOP, "random seed for seed sampling, LoRA init, data order, teacher")
    iterations: int = flag(10, LOOP, "augmentation rounds after the first fine-tune")
    mistakes: str = flag("train", LOOP, "which seed examples count as wrong: train (the trained student answers "
                                        "them wrong, as in the paper), heldout:K (a student trained without them "
                                        "answers them wrong: the seed set is split into K folds and K more adapters "
                                        "are trained per iteration), or early:F (wrong after a fraction F of the "
                                        "fine-tune's optimizer steps, or at its end: one more seed evaluation)")
    augment: str = flag("wrong", LOOP, "which seed examples the teacher gets as parents: wrong (LLM2LLM), all, or "
                                       "random (a uniform draw of as many as are wrong: the same teacher budget)")
    random_parents: Optional[str] = flag(None, LOOP, "--augment random: how many seed examples to draw in each "
                                                     "iteration, comma-separated, e.g. 12,5 (compare.py passes "
                                                     "what its llm2llm arm sent; an iteration beyond the list "
                                                     "draws none; default: as many as are wrong in this run)")
    aug_per_wrong: int = flag(1, LOOP, "new examples asked per parent")

    # the run directory
    out: Optional[str] = flag(None, RUN_DIR, "run directory (default: runs/<task>-<timestamp>); rerun with the same "
                                             "--out to resume")
    teacher_cache: Optional[str] = flag(None, RUN_DIR, "folder of cached teacher replies (default: "
                                                       "<out>/teacher_cache); runs may share one")
    force: bool = flag(False, RUN_DIR, "start over in an --out that holds a different run")
    first_student: Optional[str] = flag(None, RUN_DIR, "a run directory with the same seed set and training flags "
                                                       "whose iteration-0 student this run takes instead of training "
                                                       "its own (compare.py shares one first student between arms)")

    # torchrun
    dist_timeout: float = flag(1800.0, DISTRIBUTED, "seconds a process waits for the others before it stops with "
                                                    "an error (a dead or hung process); rank 0's teacher work keeps "
                                                    "the others waiting as long as rank 0 is alive")
    fsdp: bool = flag(False, DISTRIBUTED, "shard the frozen base model across the processes (FSDP2), for a student "
                                          "too large for one GPU")


# fields that do not change what a run computes, so a resumed run may differ in them. --device and --precision are
# checked through the precision they resolve to (recorded as precision_used), --teacher-url with a warning.
RESUME_NEUTRAL = {"out", "force", "teacher_workers", "teacher_timeout", "teacher_key_env", "teacher_url", "device",
                  "precision", "teacher_cache", "dist_timeout", "fsdp", "judge_url", "first_student"}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="llm2llm.py", usage="python llm2llm.py [flags] | serve ... | report RUN_DIR",
        description="LLM2LLM: fine-tune a student on a seed set, send the seed examples it gets wrong to a teacher, "
                    "train again on the teacher's new examples, and repeat. Subcommands: " + SUBCOMMANDS)
    groups = {}
    for f in fields(Config):
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        name, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            group.add_argument(name, action="store_true", help=text)
            continue
        # Optional[int] -> int; a field with a parser of its own names it
        kind = f.metadata["parse"] or next((t for t in getattr(f.type, "__args__", ()) if t is not type(None)),
                                           f.type)
        shown = text if "default" in text else f"{text} (default: {f.default})"  # each default said once
        group.add_argument(name, type=kind, default=f.default, help=shown.replace("%", "%%"))
    return Config(**vars(parser.parse_args(argv)))


# -----------------------------------------------------------------------------
# Checks that need no model, no data and no run directory: a bad flag costs a second, and leaves nothing behind

def check_flags(cfg, task):
    """Refuse, with a message that says what to do, flags that cannot work together or with this task."""
    for name in ("iterations", "aug_per_wrong", "epochs", "teacher_max_asks", "eval_batch_size", "batch_size"):
        if getattr(cfg, name) < (0 if name == "iterations" else 1):
            raise RunError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.train_steps is not None and cfg.train_steps < 1:
        raise RunError(f"--train-steps must be positive, got {cfg.train_steps}")
    if cfg.augment not in AUGMENT_CHOICES:
        raise RunError(f"--augment must be one of {', '.join(AUGMENT_CHOICES)}, got {cfg.augment!r}")
    parse_mistakes(cfg.mistakes)
    if parse_random_parents(cfg.random_parents) is not None and cfg.augment != "random":
        raise RunError("--random-parents sets the size of --augment random's draws: use it with --augment random")
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


def resolve_precision(cfg, device):
    """The precision training really uses, from --device and --precision."""
    precision = cfg.precision or default_precision(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise RunError(f"--precision {precision}: choose fp32, bf16 or fp16")
    if precision != "fp32" and device.type != "cuda":
        raise RunError(f"--precision {precision} needs a CUDA device; use fp32 on {device.type}")
    return precision


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
