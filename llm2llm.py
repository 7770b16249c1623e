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

This file holds the decoder (`generate`), the configuration (one dataclass = the command-line flags), the run
directory with its resume logic, and the loop. Training is in train.py, adapters in lora.py, tasks and teacher
prompts in tasks.py and prompts/, the teacher client in teacher.py, the embedded server in serve.py.
"""
import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora import LoRAError, add_lora, load_adapter, remove_lora, save_adapter
from report import ReportError, render_table, write_report
from serve import main as serve_main, make_server, start_background
from tasks import TaskError, filter_generated, get_task, sample_seed
from teacher import BUDGET_SPENT, Teacher, check_reachable
from train import TrainingError, render_prompt, train

# -----------------------------------------------------------------------------
# Decoder: batched generation with a KV cache, split into prefill and decode steps.
#
# Prompts are sorted by length and cut into batches. Within a batch, rows are left-padded; position ids come from
# the attention mask, so a padded row computes exactly what it would alone. Two refinements make it fast on small
# models, where generation time goes to memory traffic rather than matmuls:
#   - Llama-family models (Llama, Mistral, Qwen2/3, SmolLM) run through `_llama_forward`, which calls the model's own
#     modules but keeps a preallocated cache written in place and computes grouped-query attention without copying
#     the shared key/value heads. Other architectures go through the model's own forward and cache.
#   - The token prefix that all prompts share (a chat template's system prompt) is computed once; each batch's rows
#     are prefilled in length-sorted groups so padding stays small; finished rows leave the batch, so the remaining
#     rows stop paying for them.

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_forward(model, input_ids, position_ids, cache, rows, slot, key_mask):
    """Run new tokens through a Llama-style model, writing their keys/values into cache slots [slot, slot + T) of
    batch rows `rows`, attending to slots [0, slot + T) where key_mask (len(rows), slot + T) is True. Returns the
    final hidden state of the last position of every row."""
    body = model.model
    hidden = body.embed_tokens(input_ids)
    batch, length, _ = hidden.shape
    cos, sin = body.rotary_emb(hidden, position_ids)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # query t may see key s if s is a valid key and s is not in its future; a pad query also sees itself, so its
    # softmax is never over nothing (its output is garbage that no real token attends to)
    query_slot = slot + torch.arange(length, device=hidden.device)
    key_slot = torch.arange(slot + length, device=hidden.device)
    mask = key_mask[:, None, :] & (key_slot[None, None, :] <= query_slot[None, :, None])
    mask |= key_slot[None, None, :] == query_slot[None, :, None]
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        head_dim = attn.head_dim
        q = attn.q_proj(x).view(batch, length, -1, head_dim)
        k = attn.k_proj(x).view(batch, length, -1, head_dim)
        v = attn.v_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache, v_cache = cache[i]
        k_cache[rows, :, slot:slot + length] = k
        v_cache[rows, :, slot:slot + length] = v
        keys, values = k_cache[rows, :, :slot + length], v_cache[rows, :, :slot + length]
        # grouped-query attention without repeat_kv: fold the query heads that share a key/value head into the
        # sequence axis, so each key/value head is read once instead of copied `groups` times
        n_kv = keys.shape[1]
        groups = q.shape[1] // n_kv
        q = q.reshape(batch, n_kv, groups * length, head_dim)
        group_mask = mask[:, None, None].expand(batch, 1, groups, length, slot + length)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=group_mask.reshape(batch, 1, groups * length, -1),
                                             scale=attn.scaling)
        out = out.view(batch, n_kv * groups, length, head_dim).transpose(1, 2).reshape(batch, length, -1)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return body.norm(hidden[:, -1])


def _uses_fast_path(model):
    config = model.config
    return (config.model_type in FAST_MODEL_TYPES and hasattr(model, "model") and hasattr(model.model, "rotary_emb")
            and not getattr(config, "use_sliding_window", False))


def _eos_ids(model, tokenizer):
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def _pick_tokens(logits, temperature, top_p, generators):
    """Greedy (temperature 0) or nucleus sampling, one generator per row so a row's samples do not depend on which
    other rows share its batch."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    probs = probs.cpu()
    return torch.stack([torch.multinomial(probs[r], 1, generator=generators[r])[0] for r in range(len(generators))]
                       ).to(logits.device)


def _common_prefix(id_lists):
    """The longest token prefix shared by all prompts, leaving every prompt at least one token of its own."""
    first, n = id_lists[0], min(len(ids) for ids in id_lists) - 1
    for ids in id_lists[1:]:
        i = 0
        while i < n and ids[i] == first[i]:
            i += 1
        n = i
    return first[:n]


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=32, temperature=0.0, top_p=1.0, seed=None,
             stop=None, details=False, prefill_tokens=2048):
    """Complete each rendered prompt. Returns only the completions, in input order: strings, or with details=True
    dicts {text, prompt_tokens, completion_tokens, finish_reason ('stop' | 'length')}. Temperature 0 is greedy and
    token-for-token the same as Hugging Face generate(do_sample=False). `seed` is an int or one int per prompt."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    id_lists = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(ids) == 0 for ids in id_lists):
        raise ValueError("generate() got an empty prompt")
    seeds = seed if isinstance(seed, (list, tuple)) else [
        (0 if seed is None else seed) * 1_000_003 + i for i in range(len(prompts))]
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    fast = _uses_fast_path(model)
    prefix = _common_prefix(id_lists) if fast and len(prompts) > 1 else []
    if len(prefix) < 4:  # too short to be worth a separate forward pass
        prefix = []
    prefix_cache = _llama_prefix_cache(model, prefix, device)
    order = sorted(range(len(prompts)), key=lambda i: len(id_lists[i]))
    results = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        suffixes = [id_lists[i][len(prefix):] for i in batch]
        run = _run_batch_fast if fast else _run_batch_hf
        outputs = run(model, suffixes, prefix_cache, len(prefix), max_new_tokens, temperature, top_p,
                      [torch.Generator().manual_seed(int(seeds[i])) for i in batch], eos, pad_id, tokenizer, stop,
                      prefill_tokens, device)
        for i, (token_ids, finish_reason) in zip(batch, outputs):
            text = tokenizer.decode(token_ids, skip_special_tokens=True)
            if stop:
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                text = text[:cut] if cut >= 0 else text
            results[i] = {"text": text, "prompt_tokens": len(id_lists[i]), "completion_tokens": len(token_ids),
                          "finish_reason": finish_reason}
    return results if details else [r["text"] for r in results]


def _llama_prefix_cache(model, prefix, device):
    """Keys/values of the shared prefix, computed once with batch size 1."""
    if not prefix:
        return None
    cache = _new_llama_cache(model, 1, len(prefix), device)
    ids = torch.tensor([prefix], device=device)
    positions = torch.arange(len(prefix), device=device)[None]
    _llama_forward(model, ids, positions, cache, slice(0, 1), 0, torch.ones_like(ids, dtype=torch.bool))
    return cache


def _new_llama_cache(model, batch, length, device):
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = model.model.embed_tokens.weight.dtype if not torch.is_autocast_enabled(device.type) else \
        torch.get_autocast_dtype(device.type)
    shape = (batch, config.num_key_value_heads, length, head_dim)
    return [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


class _RowState:
    """Per-row bookkeeping shared by both paths: generated ids, done flags, stop-string checks."""

    def __init__(self, n_rows, max_new_tokens, eos, tokenizer, stop):
        self.tokens = [[] for _ in range(n_rows)]
        self.finish = [None] * n_rows
        self.eos, self.tokenizer, self.stop, self.max_new = set(eos), tokenizer, stop or [], max_new_tokens
        # a stop string of c characters spans at most c + 1 tokens (plus some slack for byte-level pieces)
        self.stop_window = max((len(s) for s in self.stop), default=0) + 4

    def push(self, row, token):
        if token in self.eos:
            self.finish[row] = "stop"
            return
        self.tokens[row].append(token)
        if self.stop:
            tail = self.tokenizer.decode(self.tokens[row][-self.stop_window:], skip_special_tokens=True)
            if any(s in tail for s in self.stop):
                self.finish[row] = "stop"
                return
        if len(self.tokens[row]) >= self.max_new:
            self.finish[row] = "length"

    def results(self):
        return [(t, f or "length") for t, f in zip(self.tokens, self.finish)]


def _left_pad(suffixes, pad_id, device):
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), width), dtype=torch.bool)
    for r, s in enumerate(suffixes):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = True
    return ids.to(device), mask.to(device)


def _run_batch_fast(model, suffixes, prefix_cache, n_prefix, max_new_tokens, temperature, top_p, generators, eos,
                    pad_id, tokenizer, stop, prefill_tokens, device):
    n_rows, width = len(suffixes), max(len(s) for s in suffixes)
    total = n_prefix + width + max_new_tokens
    cache = _new_llama_cache(model, n_rows, total, device)
    key_mask = torch.zeros((n_rows, total), dtype=torch.bool, device=device)
    if prefix_cache is not None:
        for (k, v), (pk, pv) in zip(cache, prefix_cache):
            k[:, :, :n_prefix] = pk
            v[:, :, :n_prefix] = pv
        key_mask[:, :n_prefix] = True
    # prefill in groups of similar length (suffixes arrive sorted), each right-aligned at slot n_prefix + width so
    # that all rows decode into the same slot
    group_rows = max(1, prefill_tokens // width)
    last_hidden = []
    for g in range(0, n_rows, group_rows):
        rows = slice(g, min(n_rows, g + group_rows))
        ids, mask = _left_pad(suffixes[rows], pad_id, device)
        slot = n_prefix + width - ids.shape[1]
        # slots left of a short group are never written yet are read (masked out). A masked slot gets zero weight,
        # but 0 * NaN is NaN, so whatever the allocator left there must be cleared: only this gap, not the cache
        for k, v in cache:
            k[rows, :, n_prefix:slot] = 0
            v[rows, :, n_prefix:slot] = 0
        key_mask[rows, slot:slot + ids.shape[1]] = mask
        positions = (n_prefix + mask.long().cumsum(-1) - 1).clamp(min=0)
        last_hidden.append(_llama_forward(model, ids, positions, cache, rows, slot, key_mask[rows, :slot + ids.shape[1]]))
    logits = model.get_output_embeddings()(torch.cat(last_hidden)).float()
    next_pos = n_prefix + torch.tensor([len(s) for s in suffixes], device=device)

    state = _RowState(n_rows, max_new_tokens, eos, tokenizer, stop)
    active = list(range(n_rows))  # original row of each batch row still in the cache
    slot = n_prefix + width
    for _ in range(max_new_tokens):
        tokens = _pick_tokens(logits, temperature, top_p, [generators[r] for r in active])
        for r, t in zip(active, tokens.tolist()):
            if state.finish[r] is None:
                state.push(r, t)
        keep = [j for j, r in enumerate(active) if state.finish[r] is None]
        if not keep:
            break
        # finished rows leave the batch, so the others stop paying for them; compacting copies the whole cache, so
        # wait until a quarter of the batch is done rather than copying once per finished row
        if len(keep) <= 0.75 * len(active):
            index = torch.tensor(keep, device=device)
            cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache]
            key_mask, next_pos, tokens = key_mask[index], next_pos[index], tokens[index]
            active = [active[j] for j in keep]
        key_mask[:, slot] = True
        hidden = _llama_forward(model, tokens[:, None], next_pos[:, None], cache, slice(None), slot,
                                key_mask[:, :slot + 1])
        logits = model.get_output_embeddings()(hidden).float()
        next_pos, slot = next_pos + 1, slot + 1
    return state.results()


def _run_batch_hf(model, suffixes, prefix_cache, n_prefix, max_new_tokens, temperature, top_p, generators, eos,
                  pad_id, tokenizer, stop, prefill_tokens, device):
    """Any causal LM through its own forward and cache (GPT-2 and friends). Finished rows are fed padding."""
    ids, mask = _left_pad(suffixes, pad_id, device)
    attention = mask.long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1].float()
    state = _RowState(len(suffixes), max_new_tokens, eos, tokenizer, stop)
    next_pos = positions[:, -1] + 1
    for _ in range(max_new_tokens):
        tokens = _pick_tokens(logits, temperature, top_p, generators)
        for r, t in enumerate(tokens.tolist()):
            if state.finish[r] is None:
                state.push(r, t)
        if all(f is not None for f in state.finish):
            break
        attention = torch.cat([attention, attention.new_ones((len(suffixes), 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1].float(), next_pos + 1
    return state.results()


# -----------------------------------------------------------------------------
# Configuration: one dataclass; its fields are the command-line flags (dashes there, underscores here).
# Defaults follow the paper where it is explicit: 1 augmentation per wrong seed example, retrain from scratch,
# 10 iterations and a 1% seed set for GSM8K. The rest are ours, chosen for a small LoRA student.

DEFAULT_STUDENT = "Qwen/Qwen2.5-0.5B-Instruct"
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
    teacher_workers: int = field(default=8, metadata={"help": "concurrent teacher requests"})
    teacher_temperature: float = field(default=0.7, metadata={"help": "teacher sampling temperature"})
    teacher_max_tokens: int = field(default=1024, metadata={"help": "max tokens per teacher reply"})
    teacher_max_asks: int = field(default=3, metadata={"help": "most times one wrong seed is sent to the teacher "
                                                       "per iteration when its replies are rejected"})
    teacher_budget_tokens: Optional[int] = field(default=None, metadata={"help": "stop asking the teacher once "
                                                                         "this many tokens are spent"})
    show_student_answer: bool = field(default=False, metadata={"help": "include the student's wrong answer in the "
                                                               "teacher's message"})
    seed_size: Optional[int] = field(default=None, metadata={"help": "number of seed examples from train"})
    seed_frac: Optional[float] = field(default=None, metadata={"help": "fraction of train used as seed "
                                                               "(default 0.01 when --seed-size is not given)"})
    seed: int = field(default=0, metadata={"help": "random seed for seed sampling, LoRA init, data order, teacher"})
    iterations: int = field(default=10, metadata={"help": "augmentation rounds after the first fine-tune"})
    aug_per_wrong: int = field(default=1, metadata={"help": "new examples asked per wrong seed example"})
    epochs: int = field(default=3, metadata={"help": "epochs per fine-tune"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (warmup, then cosine)"})
    batch_size: int = field(default=16, metadata={"help": "rows per optimizer step"})
    micro_batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per micro-batch (memory knob; "
                                                            "does not change the result)"})
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
    force: bool = field(default=False, metadata={"help": "start over in an --out that holds a different run"})


# fields that do not change what a run computes, so a resumed run may differ in them
RESUME_NEUTRAL = {"out", "force", "teacher_workers", "teacher_key_env", "teacher_url", "device"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="llm2llm.py", description=__doc__.split("\n\n")[0],
                                     epilog="subcommands: `llm2llm.py serve --model M` runs the OpenAI-compatible "
                                            "teacher server; `llm2llm.py report RUN_DIR` prints a run's report.")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        # Optional[int] -> int
        kind = next((t for t in getattr(f.type, "__args__", ()) if t is not type(None)), f.type)
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + f" (default: {f.default})")
    return Config(**vars(parser.parse_args(argv)))


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
# Models

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def load_model(name, device=None, precision=None, role="model"):
    """A causal LM and its tokenizer in eval mode, in the precision the device wants. Used for the student, the
    embedded teacher and `llm2llm.py serve`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = device or resolve_device("auto")
    looks_local = os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or name.count("/") > 1
    if looks_local and not os.path.isdir(name):
        raise RunError(f"could not load {role} {name}: no such folder. Give a local model folder (config.json, weights, tokenizer) "
                       f"or a Hugging Face model id such as {DEFAULT_STUDENT}")
    dtype = torch.float32 if device.type == "cpu" or precision == "fp32" else (
        torch.float16 if precision == "fp16" else torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise RunError(f"could not load {role} {name!r}: {str(e).splitlines()[0]}\nOffline? Pass a local folder.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# -----------------------------------------------------------------------------
# Evaluation: greedy answers on a list of rows, saved chunk by chunk so a kill repeats at most one chunk. Chunks
# are fixed slices of the row list, so a resumed evaluation batches exactly as an uninterrupted one.

def evaluate(model, tokenizer, task, rows, path, cfg, desc):
    if os.path.exists(path):
        return read_jsonl(path)
    partial = path + ".partial"
    done = read_jsonl(partial) if os.path.exists(partial) else []
    write_jsonl(partial, done)  # drop a line a kill may have cut short
    chunk = cfg.eval_batch_size * 4
    model.eval()  # no LoRA dropout at evaluation, whatever state training or loading left behind
    bar = tqdm(total=len(rows), initial=len(done), desc=desc, unit="ex", leave=False)
    for start in range(len(done) // chunk * chunk, len(rows), chunk):
        if start < len(done):  # an unfinished chunk is redone whole
            done = done[:start]
            write_jsonl(partial, done)
        batch = rows[start:start + chunk]
        prompts = [render_prompt(tokenizer, task.prompt(row)) for row in batch]
        texts = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
        predictions = [{"id": row["id"], "prediction": text, "answer": task.extract(text), "gold": task.gold(row),
                        "correct": bool(task.is_correct(text, row))} for row, text in zip(batch, texts)]
        append_jsonl(partial, predictions)
        done += predictions
        bar.update(len(batch))
    bar.close()
    os.replace(partial, path)
    return done


# -----------------------------------------------------------------------------
# Augmentation: the teacher writes new examples from the wrong SEED examples only. A seed whose replies are all
# rejected is asked again (a new sample index, so a new cache key) up to --teacher-max-asks times, then reported.

def augment(task, teacher, wrong, predictions, known_rows, test_rows, iteration, cfg):
    need = {row["id"]: cfg.aug_per_wrong for row in wrong}
    accepted, rejected = [], []
    # tokens and replies this augmentation used, whether paid now or read from the cache, so a resumed run reports
    # the same numbers as an uninterrupted one
    usage = Counter()
    for ask in range(cfg.teacher_max_asks):
        asking = [row for row in wrong if need[row["id"]] > 0]
        if not asking or teacher.budget_exhausted:
            break
        jobs = [{"messages": task.teacher_messages(
            row, need[row["id"]], predictions[row["id"]]["answer"] if cfg.show_student_answer else None),
            # a new sample index per iteration and ask: the same seed asked again must get a fresh reply, not the
            # cached one from an earlier iteration
            "sample": iteration * cfg.teacher_max_asks + ask} for row in asking]
        results = teacher.chat_many(jobs)
        for r in results:
            usage.update(prompt=r["prompt_tokens"] or 0, completion=r["completion_tokens"] or 0, replies=1)
        failed = [r["error"] for r in results if r["error"] and r["error"] != BUDGET_SPENT]
        if failed:
            raise RunError(f"the teacher failed on {len(failed)} of {len(jobs)} requests (first: {failed[0]}). "
                           f"Its finished replies are cached.")
        candidates = []
        for row, result in zip(asking, results):
            for choice in result["choices"]:
                parsed, bad = task.parse_reply(choice["text"], truncated=choice["finish_reason"] == "length")
                rejected += [{"parent_id": row["id"], "reason": reason, "text": text} for reason, text in bad]
                candidates += [dict(new, parent_id=row["id"], cache_key=result["cache_key"]) for new in parsed]
        kept, bad = filter_generated(task, candidates, known_rows + accepted, test_rows)
        rejected += bad
        for new in kept:
            parent = new.pop("parent_id")
            cache_key = new.pop("cache_key")
            if need[parent] == 0:  # the teacher wrote more items than asked for
                rejected.append({"parent_id": parent, "reason": "surplus", "text": task.format_item(new)})
                continue
            k = cfg.aug_per_wrong - need[parent]
            need[parent] -= 1
            accepted.append(dict(new, id=f"aug{iteration}-{parent}-{k}", provenance={
                "parent_id": parent, "iteration": iteration, "teacher_model": cfg.teacher_model,
                "cache_key": cache_key, "ask": ask}))
    unsatisfied = [seed_id for seed_id, n in need.items() if n > 0]
    return accepted, rejected, unsatisfied, usage


# -----------------------------------------------------------------------------
# The run directory and resuming

def prepare_run_dir(cfg):
    config = {k: v for k, v in asdict(cfg).items() if k != "force"}
    config_path = os.path.join(cfg.out, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            old = json.load(f)
        differs = [f"--{k.replace('_', '-')}: {old.get(k)!r} then, {v!r} now" for k, v in config.items()
                   if k not in RESUME_NEUTRAL and old.get(k) != v]
        if differs and not cfg.force:
            raise RunError(f"{cfg.out} holds a run with a different configuration:\n  " + "\n  ".join(differs) +
                           "\nUse the same flags to resume it, another --out, or --force to start over.")
        if differs:
            print(f"--force: deleting the previous run in {cfg.out}")
            shutil.rmtree(cfg.out)
        else:
            print(f"resuming the run in {cfg.out}")
    os.makedirs(cfg.out, exist_ok=True)
    write_json(config_path, config)  # no secrets: the API key is read from the environment, never stored


def load_metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    return {m["iteration"]: m for m in read_jsonl(path)} if os.path.exists(path) else {}


class LazyTeacher:
    """Starts the teacher (and, without --teacher-url, the embedded server) only when first needed: a resumed run
    with nothing left to ask never loads a teacher model."""

    def __init__(self, cfg, device):
        self.cfg, self.device, self.client, self.server = cfg, device, None, None

    def get(self):
        if self.client is None:
            cfg, url = self.cfg, self.cfg.teacher_url or os.environ.get("OPENAI_BASE_URL")
            if not url:
                model, tokenizer = load_model(cfg.teacher_model, self.device, cfg.precision, "teacher")
                self.server = make_server(model, tokenizer, generate, model_name=cfg.teacher_model,
                                          max_batch=max(cfg.teacher_workers, 1) * 2)
                start_background(self.server)
                url = self.server.url
                print(f"embedded teacher {cfg.teacher_model} at {url}")
            try:
                check_reachable(url, cfg.teacher_key_env)
            except RuntimeError as e:
                raise RunError(str(e))
            self.client = Teacher(url, cfg.teacher_model, api_key_env=cfg.teacher_key_env,
                                  cache_dir=os.path.join(cfg.out, "teacher_cache"), workers=cfg.teacher_workers,
                                  budget_tokens=cfg.teacher_budget_tokens, temperature=cfg.teacher_temperature,
                                  max_tokens=cfg.teacher_max_tokens, seed=cfg.seed)
        return self.client

    def close(self):
        if self.server is not None:
            self.server.shutdown()


# -----------------------------------------------------------------------------
# The LLM2LLM loop

def run(cfg):
    task = get_task(cfg.task, test_file=cfg.test_file, answer_type=cfg.answer_type)
    if cfg.seed_size is None and cfg.seed_frac is None:
        cfg.seed_frac = 0.01
    cfg.out = cfg.out or os.path.join("runs", f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    for name in ("iterations", "aug_per_wrong", "epochs", "teacher_max_asks", "eval_batch_size", "batch_size"):
        if getattr(cfg, name) < (0 if name == "iterations" else 1):
            raise RunError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    device = resolve_device(cfg.device)
    train_rows = task.load("train", cfg.data_dir)
    test_rows = task.load("test", cfg.data_dir)[:cfg.test_limit]
    if not train_rows:
        raise RunError(f"the {task.name} train split is empty")
    prepare_run_dir(cfg)
    print("config:", json.dumps(asdict(cfg)))

    seed_path = os.path.join(cfg.out, "seed.jsonl")
    if not os.path.exists(seed_path):
        write_jsonl(seed_path, sample_seed(task, train_rows, size=cfg.seed_size, frac=cfg.seed_frac, seed=cfg.seed))
    seed_rows = read_jsonl(seed_path)
    print(f"{task.name}: {len(seed_rows)} seed examples of {len(train_rows)} train rows, {len(test_rows)} test rows, "
          f"{cfg.iterations} iterations, {cfg.aug_per_wrong} new example(s) per wrong seed")

    model, tokenizer = load_model(cfg.student, device, cfg.precision, "student")
    teacher = LazyTeacher(cfg, device)
    metrics = load_metrics(cfg.out)
    data = seed_rows
    try:
        for i in range(cfg.iterations + 1):
            step_dir = os.path.join(cfg.out, f"iter_{i:02d}")
            os.makedirs(step_dir, exist_ok=True)
            train_path = os.path.join(step_dir, "train.jsonl")
            if not os.path.exists(train_path):
                write_jsonl(train_path, data)
            data = read_jsonl(train_path)
            if i not in metrics:  # a finished iteration (it has its metrics row) is not run again
                row = run_iteration(i, cfg, task, model, tokenizer, teacher, seed_rows, data, test_rows, step_dir)
                append_jsonl(os.path.join(cfg.out, "metrics.jsonl"), [row])
                metrics[i] = row
                print(render_table(list(metrics.values())))
            row = metrics[i]
            if row["n_wrong"] == 0:
                print(f"no seed example is wrong after iteration {i}: stopping early")
                break
            if row.get("stopped"):
                print(f"stopping: {row['stopped']}")
                break
            data = data + read_jsonl(os.path.join(step_dir, "augmented.jsonl"))
    finally:
        teacher.close()
    write_report(cfg.out)
    print(f"report: {os.path.join(cfg.out, 'report.md')} and report.svg")
    return cfg.out


def run_iteration(i, cfg, task, model, tokenizer, teacher, seed_rows, data, test_rows, step_dir):
    # 1. fine-tune: a fresh adapter on the frozen base ("from scratch"), or the previous one with --continue-training
    adapter_dir, stats_path = os.path.join(step_dir, "adapter"), os.path.join(step_dir, "train_stats.json")
    checkpoint_path = os.path.join(step_dir, "train_state.pt")
    previous = os.path.join(os.path.dirname(step_dir), f"iter_{i - 1:02d}", "adapter")
    remove_lora(model)
    if os.path.exists(os.path.join(adapter_dir, "adapter_config.json")) and os.path.exists(stats_path):
        load_adapter(model, adapter_dir)
        with open(stats_path) as f:
            stats = json.load(f)
    else:
        torch.manual_seed(cfg.seed)
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        if cfg.continue_training and i > 0:
            load_adapter(model, previous)
        print(f"iteration {i}: training on {len(data)} examples")
        stats = train(model, tokenizer, [(task.prompt(r), task.response(r)) for r in data], epochs=cfg.epochs,
                      lr=cfg.lr, batch_size=cfg.batch_size, micro_batch_tokens=cfg.micro_batch_tokens,
                      precision=cfg.precision, seed=cfg.seed + i, max_seq_len=cfg.max_seq_len,
                      checkpoint_path=checkpoint_path)
        save_adapter(model, adapter_dir, base_model_name_or_path=cfg.student)
        stats = {k: stats[k] for k in ("steps", "train_tokens", "train_seconds", "final_loss")}
        write_json(stats_path, stats)
        if os.path.exists(checkpoint_path):
            os.remove(checkpoint_path)

    # 2. evaluate on the seed set (to find what to augment) and on the test set
    t0 = time.time()
    seed_preds = evaluate(model, tokenizer, task, seed_rows, os.path.join(step_dir, "seed_predictions.jsonl"), cfg,
                          f"iter {i} seed eval")
    test_preds = evaluate(model, tokenizer, task, test_rows, os.path.join(step_dir, "test_predictions.jsonl"), cfg,
                          f"iter {i} test eval") if test_rows else []
    eval_seconds = time.time() - t0
    by_id = {p["id"]: p for p in seed_preds}
    wrong = [row for row in seed_rows if not by_id[row["id"]]["correct"]]

    # 3. the teacher writes new examples from the wrong seed examples (none after the last iteration)
    accepted, rejected, unsatisfied, stopped = [], [], [], None
    t0 = time.time()
    aug_path, rejected_path = os.path.join(step_dir, "augmented.jsonl"), os.path.join(step_dir, "rejected.jsonl")
    if i < cfg.iterations and wrong:
        client = teacher.get()
        requests_before = client.requests
        accepted, rejected, unsatisfied, usage = augment(task, client, wrong, by_id, data, test_rows, i, cfg)
        print(f"teacher: {len(accepted)} new examples from {len(wrong)} wrong seeds, {len(rejected)} rejected, "
              f"{client.requests - requests_before} HTTP requests for {usage['replies']} replies (the rest from the cache)")
        if unsatisfied:
            print(f"{len(unsatisfied)} wrong seed example(s) got no acceptable new example after "
                  f"{cfg.teacher_max_asks} asks: {', '.join(unsatisfied[:10])}")
        if client.budget_exhausted:
            stopped = f"teacher token budget of {cfg.teacher_budget_tokens} spent"
    else:
        usage = Counter()
    write_jsonl(rejected_path, rejected)
    write_jsonl(aug_path, accepted)
    teacher_seconds = time.time() - t0
    return {"iteration": i, "train_size": len(data), "n_seed": len(seed_rows), "n_wrong": len(wrong),
            "n_augmented": len(accepted), "n_rejected": len(rejected),
            "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)), "unsatisfied": unsatisfied,
            "seed_acc": 1 - len(wrong) / len(seed_rows),
            "test_acc": (sum(p["correct"] for p in test_preds) / len(test_preds)) if test_preds else None,
            "teacher_prompt_tokens": usage["prompt"], "teacher_completion_tokens": usage["completion"],
            "teacher_requests": usage["replies"],
            "train_tokens": stats["train_tokens"], "train_seconds": stats["train_seconds"],
            "final_loss": stats["final_loss"], "eval_seconds": eval_seconds,
            "teacher_seconds": teacher_seconds, "stopped": stopped}


# -----------------------------------------------------------------------------
# Entry point: `python llm2llm.py [flags]` runs the loop; `serve` and `report` are subcommands.

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        if argv[:1] == ["serve"]:
            return serve_main(argv[1:], generate_fn=generate, load_fn=load_model)
        if argv[:1] == ["report"]:
            if len(argv) != 2:
                raise RunError("usage: python llm2llm.py report RUN_DIR")
            print(write_report(argv[1]))
            print(f"wrote {os.path.join(argv[1], 'report.md')} and report.svg")
            return 0
        cfg = parse_args(argv)
        run(cfg)
        return 0
    except (RunError, TaskError, LoRAError, TrainingError, ReportError) as e:
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
