"""Training throughput: our LoRA loop (lora.add_lora + train.train) against the usual peft recipe, in one process.

    python bench/bench_train.py                                   # SmolLM2-135M-Instruct, CPU fp32, 32 GSM8K rows
    python bench/bench_train.py --rows 64 --model PATH --data ../shared/data/gsm8k/train.jsonl
    python bench/bench_train.py --device cuda --precision bf16 --config qwen2.5-0.5b --rows 512   # GPU, random init
    python bench/bench_train.py --device cuda --precision bf16 --config llama2-7b --rows 256 --batch-size 32

Both sides train the same base weights on the same GSM8K rows, rendered identically (train.render_prompt +
response + EOS), with LoRA r=8, alpha=16, dropout 0.05 on all seven projections, AdamW at the same lr, 8 rows per
optimizer step. The baseline is driven the way peft users usually do it: get_peft_model, rows in random order,
each batch padded to its longest row, `model(input_ids, attention_mask, labels)` with labels = input_ids and -100 on
pads (so prompt tokens carry loss too), one optimizer step per batch. Ours groups rows by length, cuts
micro-batches by a token budget, and runs the lm_head only on response positions. A few warmup steps on other rows
are run and excluded first for both, then the timed rows run in two halves in ABBA order. The score is non-pad
tokens per second; the machine may be shared, so the ratio of the two, measured side by side in one process, is
the number to trust, not the absolute rates.

MFU (CUDA only) counts 4 N FLOPs per non-pad token, N = the weights of every matmul of the base model (all linear
layers including lm_head, not the input embedding lookup): 2 N for the forward pass and 2 N for the backward pass
through the activations; frozen weights get no weight gradient, and the LoRA matmuls (<1% of N) and attention
scores are left out. The same count is used for both sides, so it measures useful work (ours really does less on
prompt positions), against the GPU's dense bf16 peak (--peak-tflops to override).

Prints one JSON line: {"bench": "train", "model", "rows", "ours_tok_s", "peft_tok_s", "ratio", "peak_memory_gib",
...}. peak_memory_gib is the process's peak (CUDA: the most memory tensors held; CPU: the resident set), over both
sides, so it includes both copies of the base weights.
"""
import argparse
import contextlib
import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import lora  # noqa: E402
import train  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 tensor-core peaks (no sparsity), by substring of the device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "4090": 165.0}


# -----------------------------------------------------------------------------
# Model, tokenizer and rows

def smollm2_path():
    script = ROOT.parent / "shared" / "models" / "smollm2.sh"
    if not script.exists():
        return None
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else None


def byte_tokenizer():
    # A stand-in for GPU boxes without the SmolLM2 files: one token per byte, a ChatML-like template. Only
    # sequence lengths matter for throughput on a randomly initialised model.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def build_model(args):
    """(base model in eval mode on the device, tokenizer, display name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config
    path = args.model or smollm2_path()
    if args.config == "smollm2":
        if not path or not os.path.isdir(path):
            sys.exit(f"SmolLM2 model folder not found ({path!r}): pass --model PATH, or run "
                     f"`bash ../shared/models/smollm2.sh` first")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.to(args.device).eval(), AutoTokenizer.from_pretrained(path), "SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(path) if path and os.path.isdir(path) else byte_tokenizer()
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.config == "llama2-7b":
        config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, **special)
    else:
        config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                             max_position_embeddings=32768, **special)
    torch.manual_seed(0)
    # the frozen base in the training precision, as llm2llm loads it on CUDA: autocast then never re-casts it
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    with torch.device(args.device):  # initialise on the GPU: billions of parameters are slow to init on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer, f"{args.config}-shape (random init)"


def load_pairs(path, n, seed):
    if not os.path.isfile(path):
        sys.exit(f"{path} not found: pass --data with a GSM8K train.jsonl (fields question, answer)")
    pairs = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((row["question"], row["answer"]))
            except (json.JSONDecodeError, KeyError) as e:
                sys.exit(f"{path}:{line_no}: not a GSM8K row with question and answer ({e})")
    if len(pairs) < n:
        sys.exit(f"{path} has {len(pairs)} rows, fewer than the {n} needed: lower --rows or --warmup-steps")
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def matmul_params(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def peak_memory_gib(device):
    """Peak GPU memory allocated by tensors on CUDA; on CPU the process's peak resident set (weights included)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux reports KiB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# The peft baseline: the loop most LoRA tutorials write

def peft_train(model, tokenizer, pairs, args, device):
    examples = [train.encode_pair(tokenizer, p, r, args.max_seq_len) for p, r in pairs]
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    model.train()
    sync(device)
    t0, tokens, padded = time.perf_counter(), 0, 0
    for start in range(0, len(order), args.batch_size):
        batch = [examples[i][0] for i in order[start:start + args.batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # pad id may equal EOS: mask by position
        input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
        with torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext():
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(attention_mask.sum())
        padded += input_ids.numel()
    loss.item()
    sync(device)
    model.eval()
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "padded_tokens": padded,
            "steps": -(-len(order) // args.batch_size)}


def ours_train(model, tokenizer, pairs, args):
    stats = train.train(model, tokenizer, pairs, epochs=1, lr=args.lr, batch_size=args.batch_size,
                        micro_batch_tokens=args.micro_batch_tokens, warmup_frac=0.1, precision=args.precision,
                        seed=args.seed, max_seq_len=args.max_seq_len, progress=False)
    return {"seconds": stats["train_seconds"], "tokens": stats["train_tokens"], "steps": stats["steps"]}


# -----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["smollm2", "qwen2.5-0.5b", "llama2-7b"], default="smollm2",
                    help="real SmolLM2 weights, or a random model of Qwen2.5-0.5B's or Llama-2-7B's shape")
    ap.add_argument("--model", help="SmolLM2 folder (default: printed by ../shared/models/smollm2.sh)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    ap.add_argument("--rows", type=int, default=32, help="timed rows per side (default: ~5 min on an idle 2-core CPU)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed steps per side, on other rows")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: dense bf16 of known GPUs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.precision != "fp32" and device.type != "cuda":
        sys.exit(f"--precision {args.precision} needs --device cuda; use fp32 on {device.type}")

    import peft  # the baseline only: a test/bench dependency, never a runtime one
    base, tokenizer, name = build_model(args)
    n_warm = args.warmup_steps * args.batch_size
    pairs = load_pairs(args.data, args.rows + n_warm, args.seed)
    warm_pairs, pairs = pairs[:n_warm], pairs[n_warm:]
    n_matmul = matmul_params(base)

    # Both sides start from identical copies of the same base weights.
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=SEVEN, task_type="CAUSAL_LM"))
    ours_model = lora.add_lora(base, r=8, alpha=16, dropout=0.05, targets=SEVEN, verbose=False)
    assert lora.count_parameters(ours_model)[0] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    if warm_pairs:
        peft_train(peft_model, tokenizer, warm_pairs, args, device)
        ours_train(ours_model, tokenizer, warm_pairs, args)
    # Timed in two halves, ordered peft-ours then ours-peft: on a shared machine the load drifts, and this
    # ABBA order cancels a steady drift instead of charging it all to whichever side runs second.
    half = len(pairs) // 2 // args.batch_size * args.batch_size or len(pairs)
    theirs, ours = {"seconds": 0.0, "tokens": 0, "padded_tokens": 0, "steps": 0}, {"seconds": 0.0, "tokens": 0,
                                                                                   "steps": 0}
    for chunk, order in ((pairs[:half], "po"), (pairs[half:], "op")):
        for side in order if chunk else "":
            stats = (peft_train(peft_model, tokenizer, chunk, args, device) if side == "p"
                     else ours_train(ours_model, tokenizer, chunk, args))
            for k, v in stats.items():
                (theirs if side == "p" else ours)[k] += v
    assert ours["tokens"] == theirs["tokens"], "both sides must see the same non-pad tokens"

    ours_tok_s, peft_tok_s = ours["tokens"] / ours["seconds"], theirs["tokens"] / theirs["seconds"]
    result = {"bench": "train", "model": name, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads", "precision": args.precision,
              "rows": len(pairs), "batch_size": args.batch_size, "steps": ours["steps"], "tokens": ours["tokens"],
              "ours_tok_s": round(ours_tok_s, 1), "peft_tok_s": round(peft_tok_s, 1),
              "ratio": round(ours_tok_s / peft_tok_s, 3), "ours_s": round(ours["seconds"], 2),
              "peft_s": round(theirs["seconds"], 2),
              "peft_pad_fraction": round(1 - theirs["tokens"] / theirs["padded_tokens"], 3),
              "matmul_params": n_matmul, "peak_memory_gib": peak_memory_gib(device)}
    if device.type == "cuda":
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                         if k in torch.cuda.get_device_name(device)), None)
        if peak:
            result["mfu_ours"] = round(4 * n_matmul * ours_tok_s / (peak * 1e12), 4)
            result["mfu_peft"] = round(4 * n_matmul * peft_tok_s / (peak * 1e12), 4)
            result["peak_tflops"] = peak
    print(json.dumps(result))


if __name__ == "__main__":
    main()
