"""The run directory: every file the loop writes, how a run resumes, and what a resume must match.

    runs/<task>-<timestamp>/
      config.json, seed.jsonl, metrics.jsonl, teacher_cache/, report.md, report.svg
      iter_00/ iter_01/ ...   train.jsonl, adapter/, seed_predictions.jsonl, test_predictions.jsonl,
                              mistakes.jsonl, augmented.jsonl, rejected.jsonl (and folds/ or early_eval.json
                              with --mistakes heldout:K or early:F)

Every file is written whole (temporary file + rename) or appended line by line, so a kill at any moment leaves
either the old state or the new one, never half a file. Rerunning the same command with the same --out resumes: a
finished step is read back, never redone, and a resume whose configuration differs from config.json is refused
with a list of what differs.

    from rundir import load_metrics, read_jsonl
    metrics = load_metrics("runs/trec-20261202-101500")   # {iteration: metrics row}
"""
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, fields

from safetensors import safe_open

import dist
from config import RESUME_NEUTRAL, Config, RunError, check_flags, parse_mistakes, resolve_precision
from cost import resolve_teacher_cost
from tasks import PROMPTS_DIR, get_task, sample_seed
from teacher import check_reachable

# -----------------------------------------------------------------------------
# Files written whole or line by line

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
# Starting and resuming a run

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


def prepare_run_dir(cfg, recorded, fresh_seed):
    """Start the run directory, or resume the run in it; returns the seed rows. `recorded` holds what the flags do
    not show but a resumed run must keep: the precision they resolve to and the prompt files' hashes; the seed set's
    hash is recorded too. Whatever does not match is refused with a message naming the file, unless --force starts
    over. A directory where nothing was computed yet (a start that failed before its first fine-tune) is simply
    taken over by the new configuration, so fixing a bad flag never needs --force."""
    config = {k: v for k, v in asdict(cfg).items() if k != "force"}
    config.update(recorded)
    config_path, seed_path = os.path.join(cfg.out, "config.json"), os.path.join(cfg.out, "seed.jsonl")
    old = read_config(config_path) if os.path.exists(config_path) else None
    if old is None and os.path.exists(config_path) or old is None and has_work(cfg.out):
        problem = (f"{config_path} is not a JSON object" if os.path.exists(config_path) else
                   f"{cfg.out} holds iteration folders but no config.json")
        if not cfg.force:
            raise RunError(f"{problem}, so the run in it cannot be checked or resumed. Restore the file, use another "
                           f"--out, or --force to start over (it deletes the run directory).")
        print(f"--force: deleting {cfg.out}")
        shutil.rmtree(cfg.out)
        lock(cfg.out)  # the lock file went with the folder
    elif old is not None:
        differs = config_differences(old, config, recorded, cfg)
        if os.path.exists(seed_path) and "seed_sha256" in old and file_sha256(seed_path) != old["seed_sha256"]:
            differs.append(f"{seed_path} no longer holds the seed set this run started with (sha256 "
                           f"{old['seed_sha256'][:12]} then, {file_sha256(seed_path)[:12]} now): restore it")
        if differs and not has_work(cfg.out):
            print(f"{cfg.out}: nothing was computed there yet, so it starts afresh with this configuration")
            for name in ("config.json", "seed.jsonl"):
                if os.path.exists(os.path.join(cfg.out, name)):
                    os.remove(os.path.join(cfg.out, name))
        elif differs and not cfg.force:
            raise RunError(f"{cfg.out} holds a run with a different configuration:\n  " + "\n  ".join(differs) +
                           "\nUse the same flags to resume it, another --out, or --force to start over.")
        elif differs:
            print(f"--force: deleting the previous run in {cfg.out}")
            shutil.rmtree(cfg.out)
            lock(cfg.out)
        else:
            print(f"resuming the run in {cfg.out}")
            if "teacher_url" in old and old["teacher_url"] != cfg.teacher_url:
                print(f"warning: this run's teacher was {old['teacher_url'] or 'the embedded server'}, now it is "
                      f"{cfg.teacher_url or 'the embedded server'}. Cached replies are reused as {cfg.teacher_model}'s "
                      f"and new ones come from the new endpoint: if it serves another model under that name, the run "
                      f"mixes two teachers. Use another --out to keep them apart.")
    if old is None and os.path.exists(seed_path):
        os.remove(seed_path)  # left by a start that never recorded its configuration
    os.makedirs(cfg.out, exist_ok=True)
    if not os.path.exists(seed_path):
        write_jsonl(seed_path, fresh_seed)
    config["seed_sha256"] = file_sha256(seed_path)
    write_json(config_path, config)  # no secrets: the API key is read from the environment, never stored
    opened.add(os.path.abspath(cfg.out))
    return read_jsonl(seed_path)


def config_differences(old, config, recorded, cfg):
    """What a resume would change: each as 'what: value then, value now'."""
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
    before_hashes = old.get("prompt_sha256", recorded["prompt_sha256"])
    for name, digest in recorded["prompt_sha256"].items():
        before = before_hashes.get(name, digest) if isinstance(before_hashes, dict) else None
        if before != digest:
            differs.append(f"{name} was edited since the run started (sha256 {str(before)[:12]} then, "
                           f"{str(digest)[:12]} now); restore it to resume")
    return differs


def read_config(path):
    """The recorded configuration, or None when the file is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def has_work(out):
    """Whether anything was computed in `out`: a finished iteration, training or evaluation under way, or teacher
    replies. The training rows of iteration 0 alone are written before anything is computed."""
    if os.path.exists(os.path.join(out, "metrics.jsonl")) and os.path.getsize(os.path.join(out, "metrics.jsonl")):
        return True
    for name in os.listdir(out) if os.path.isdir(out) else []:
        path = os.path.join(out, name)
        if name.startswith("iter_") and os.path.isdir(path) and set(os.listdir(path)) - {"train.jsonl"}:
            return True
        if name == "teacher_cache" and os.path.isdir(path) and os.listdir(path):
            return True
    return False


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -----------------------------------------------------------------------------
# One run per directory. Two processes on one --out would double the metrics rows and pay the teacher twice, so the
# directory is locked with an OS file lock (OUT/.lock). The OS releases it when its holder dies, so a killed run
# never blocks the next one. The holder's PID is written in the file for the message, and cleared on release.

_held = {}
opened = set()  # the run directories this process holds a run of (prepared, with this configuration)


def lock(path):
    """Take the lock of directory `path` (made if missing), or stop with a message naming the holder's PID."""
    os.makedirs(path, exist_ok=True)
    key = os.path.abspath(path)
    if key in _held and not _held[key].closed:
        if os.path.exists(os.path.join(path, ".lock")):
            return
        _held.pop(key).close()  # its file was deleted with the folder (--force): lock the new one
    f = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunError(f"{path} is in use by another llm2llm process (PID {holder}). Wait for it to finish or stop "
                       f"it, or use another --out.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[key] = f


def unlock(path):
    f = _held.pop(os.path.abspath(path), None) if path else None
    if f is not None and not f.closed:
        f.seek(0)
        f.truncate()  # a finished run leaves an empty lock file: rerunning it changes no file
        f.close()


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


def start_run(cfg, device):
    """Check everything that can be checked before any model is loaded, then open the run directory (new or
    resumed) and draw the seed set. Rank 0 alone. Returns (task, seed rows, test rows, finished metrics rows,
    the fields of cfg it resolved), so the other ranks get the same."""
    task = get_task(cfg.task, test_file=cfg.test_file, answer_type=cfg.answer_type)
    if cfg.seed_size is None and cfg.seed_frac is None:
        cfg.seed_frac = 0.01
    cfg.out = cfg.out or os.path.join("runs", f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_flags(cfg, task)
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
    # drawn before the run directory exists, so a seed set that cannot be drawn leaves nothing behind
    fresh_seed = sample_seed(task, train_rows, size=cfg.seed_size, frac=cfg.seed_frac, seed=cfg.seed)
    mode, folds = parse_mistakes(cfg.mistakes)
    if mode == "heldout" and folds > len(fresh_seed):
        raise RunError(f"--mistakes {cfg.mistakes}: {folds} folds need at least {folds} seed examples, and the seed "
                       f"set has {len(fresh_seed)}; use fewer folds")
    lock(cfg.out)
    seed_rows = prepare_run_dir(cfg, recorded, fresh_seed)
    if cfg.first_student and not (mode == "early" and cfg.iterations > 0):
        # --mistakes early evaluates the seed set part-way through this very fine-tune: such a run trains its own
        take_first_student(cfg.first_student, cfg)
    print("config:", json.dumps(asdict(cfg)))
    print(f"device {device}, precision {recorded['precision_used']}")
    if cfg.iterations > 0:
        print(cost_line)
    if dist.active():
        print(f"distributed: {dist.describe()}" + (", base model sharded (FSDP2)" if cfg.fsdp else ""))
    elif cfg.fsdp:
        print("--fsdp: one process, nothing to shard (launch with torchrun to shard the model)")
    asks = {"questions": f"{plural(cfg.aug_per_wrong, 'new example')} per parent",
            "solutions": f"{plural(cfg.samples_per_wrong, 'teacher solution')} sampled per parent",
            "both": f"{plural(cfg.aug_per_wrong, 'new example')} and {plural(cfg.samples_per_wrong, 'teacher solution')}"
                    f" sampled per parent"}[cfg.teacher_mode]
    print(f"{task.name}: {len(seed_rows)} seed examples of {len(train_rows)} train rows, {len(test_rows)} test rows, "
          f"{plural(cfg.iterations, 'iteration')}, {asks}" +
          (f", each new problem verified by {plural(cfg.verify, 'solution')}" if cfg.verify else "") +
          f", mistakes: {cfg.mistakes}")
    return task, seed_rows, test_rows, load_metrics(cfg.out), {k: getattr(cfg, k) for k in RESOLVED}


RESOLVED = ("out", "seed_frac", "teacher_url", "teacher_params")  # fields start_run fills in


# A first student shared between runs: compare.py trains the iteration-0 student of a seed once, in its llm2llm run,
# and every other arm of that seed takes it, so the arms are compared on one common first student and a fine-tune
# and two evaluations per arm are saved. It is taken only into a run that has not trained its own, only from a run
# with the same seed set, and never when damaged.

FIRST_STUDENT_FILES = ("adapter", "train_stats.json", "seed_predictions.jsonl", "test_predictions.jsonl")
SAME_FIRST_STUDENT = ("task", "data_dir", "test_file", "answer_type", "test_limit", "student", "seed", "epochs",
                      "min_steps", "train_steps", "lr", "batch_size", "lora_r", "lora_alpha", "lora_dropout",
                      "max_seq_len", "max_new_tokens", "precision_used", "seed_sha256")


def take_first_student(source_dir, cfg):
    source, target = os.path.join(source_dir, "iter_00"), os.path.join(cfg.out, "iter_00")
    if os.path.exists(os.path.join(target, "train_stats.json")):
        return  # already taken, or this run trained its own
    if not all(os.path.exists(os.path.join(source, name)) for name in FIRST_STUDENT_FILES):
        return  # nothing finished there: this run trains its own
    theirs, ours = read_config(os.path.join(source_dir, "config.json")) or {}, read_config(
        os.path.join(cfg.out, "config.json"))
    differs = [name for name in SAME_FIRST_STUDENT if theirs.get(name) != ours.get(name)]
    if differs:
        raise RunError(f"--first-student {source_dir} trained another first student (it differs in "
                       f"{', '.join(differs)}); leave --first-student out to train this run's own")
    weights = os.path.join(source, "adapter", "adapter_model.safetensors")
    try:
        with safe_open(weights, framework="pt"):
            pass
    except Exception as e:  # missing, truncated or not safetensors: never copied on
        raise RunError(f"the shared first student is damaged: {weights} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]}). Delete {source_dir} to train it again, then rerun.") from None
    os.makedirs(target, exist_ok=True)
    for name in ("seed_predictions.jsonl", "test_predictions.jsonl"):
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    shutil.copytree(os.path.join(source, "adapter"), os.path.join(target, "adapter"), dirs_exist_ok=True)
    # train_stats.json last: fine_tune trusts an adapter only once its statistics are there
    shutil.copyfile(os.path.join(source, "train_stats.json"), os.path.join(target, "train_stats.json"))
    print(f"iteration 0: the first student is taken from {source_dir}")


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


def plural(n, noun):
    """'1 iteration', '2 iterations'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
