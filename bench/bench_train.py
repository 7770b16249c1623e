"""Training throughput: our LoRA loop (lora.add_lora + train.train) against the usual peft recipe, in one process.

    python bench/bench_train.py                                   # SmolLM2-135M-Instruct, CPU fp32, 32 GSM8K rows
    python bench/bench_train.py --rows 64 --model PATH --data ../shared/data/gsm8k/train.jsonl
    python bench/bench_train.py --device cuda --precision bf16 --config qwen2.5-0.5b --rows 1024 --batch-size 32
    python bench/bench_train.py --device cuda --precision bf16 --config llama2-7b --rows 512 --batch-size 32

Both sides train the same base weights on the same GSM8K rows, rendered identically (train.render_prompt +
response + EOS), with LoRA r=8, alpha=16, dropout 0.05 on all seven projections, AdamW at the same lr, the same
rows per optimizer step (--batch-size). On CUDA with bf16 both start from the same bf16 base weights (as
generate.load_model loads a student there). The baseline is driven the way peft users usually do it:
get_peft_model, rows in random order, each batch padded to its longest row, `model(input_ids, attention_mask,
labels)` with labels = input_ids and -100 on pads (so prompt tokens carry loss too), one optimizer step per batch.
Ours runs with the project's defaults (on CUDA: micro-batches sized from free memory) unless flags say otherwise.
A few warmup steps on other rows are run and excluded first for both, then the timed rows run in two halves in ABBA
order. The score is non-pad tokens per second; the machine may be shared, so the ratio of the two, measured side by
side in one process, is the number to trust, not the absolute rates.

Models: `smollm2` is the real SmolLM2-135M-Instruct; `qwen2.5-0.5b` and `llama2-7b` are randomly initialised models
of those shapes (weights do not matter for speed; llama2-7b: hidden 4096, 32 layers, 32 heads, intermediate 11008,
vocabulary 32000), tokenised with the SmolLM2 tokenizer when present (ids folded into a smaller vocabulary, so
lengths stay realistic) or one token per byte.

FLOPs and MFU. Each side is credited with the FLOPs its job needs for the rows it trained (pads count nothing):
    per row of T tokens, R of them predicted with a loss:
        4 N_body T          frozen matmuls: 2 N forward + 2 N backward to the activations (no weight gradient)
      + 4 N_head R          the lm_head where a loss is needed: R = response tokens for ours, T for peft
      + 6 L d T (T + 1)     causal attention scores and values: forward 2 L d T (T + 1), backward twice that
      + 6 N_lora T          LoRA: forward, backward to the activations, and the A/B weight gradients
with N_body the weights of every linear layer but the lm_head, N_head the lm_head's, L layers, d the query width
(heads x head size). The embedding lookup, norms and elementwise work count nothing. MFU = FLOPs / seconds / the
device's dense bf16 peak (CUDA only; --peak-tflops to override); achieved TFLOP/s are printed on any device.
Peak memory: torch.cuda.max_memory_allocated per side on CUDA; the process's peak resident set (ru_maxrss,
both sides together) on CPU.

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
import resource
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


class FoldedTokenizer:
    """A tokenizer whose ids are folded into a smaller vocabulary (id % vocab): a random model with a smaller
    vocabulary than the tokenizer's still sees rows of realistic length."""

    def __init__(self, tokenizer, vocab):
        self.tokenizer, self.vocab = tokenizer, vocab

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, **kwargs):
        return {"input_ids": [i % self.vocab for i in self.tokenizer(text, **kwargs)["input_ids"]]}

    @property
    def eos_token_id(self):
        return self.tokenizer.eos_token_id % self.vocab

    @property
    def pad_token_id(self):
        return self.tokenizer.pad_token_id % self.vocab


def build_model(args):
    """(base model in eval mode on the device, tokenizer, display name). On CUDA with bf16 the weights are bf16,
    as generate.load_model gives them; otherwise fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config
    path = args.model or smollm2_path()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.config == "smollm2":
        if not path or not os.path.isdir(path):
            sys.exit(f"SmolLM2 model folder not found ({path!r}): pass --model PATH, or run "
                     f"`bash ../shared/models/smollm2.sh` first")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(args.device).eval(), AutoTokenizer.from_pretrained(path), "SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(path) if path and os.path.isdir(path) else byte_tokenizer()
    if args.config == "qwen2.5-0.5b":
        config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                             max_position_embeddings=32768)
    else:
        config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
                             max_position_embeddings=4096)
    if len(tokenizer) > config.vocab_size:
        tokenizer = FoldedTokenizer(tokenizer, config.vocab_size)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
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


def flop_shape(model):
    """The numbers the FLOP count needs, taken from the base model before adapters are added."""
    head = model.get_output_embeddings()
    config = model.config
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"n_head": head.weight.numel(), "layers": config.num_hidden_layers,
            "n_body": sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head),
            "query_width": config.num_attention_heads * head_size}


def training_flops(shape, lengths, loss_lengths, lora_params):
    """FLOPs of LoRA training on rows of the given lengths, with a loss on loss_lengths tokens of each (the formula
    is in the docstring at the top)."""
    return sum(4 * shape["n_body"] * t + 4 * shape["n_head"] * r + 6 * shape["layers"] * shape["query_width"] * t
               * (t + 1) + 6 * lora_params * t for t, r in zip(lengths, loss_lengths))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux: the process's peak RSS


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


def ours_train(model, tokenizer, pairs, args, device):
    sync(device)
    stats = train.train(model, tokenizer, pairs, epochs=1, lr=args.lr, batch_size=args.batch_size,
                        micro_batch_tokens=args.micro_batch_tokens, warmup_frac=0.1, precision=args.precision,
                        seed=args.seed, max_seq_len=args.max_seq_len, grad_checkpoint=args.grad_checkpoint,
                        compile=args.compile, progress=args.verbose)
    sync(device)  # train() ends on a host sync (the loss of its last step), so this adds nothing but certainty
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
    ap.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step, both sides")
    ap.add_argument("--micro-batch-tokens", type=train.parse_micro_batch_tokens, default="auto",
                    help="ours: tokens per micro-batch, or auto (CUDA: from free memory; CPU: 4096)")
    ap.add_argument("--grad-checkpoint", action="store_true", help="ours: activation checkpointing")
    ap.add_argument("--compile", action="store_true", help="ours: torch.compile the decoder")
    ap.add_argument("--no-peft", action="store_true", help="time ours only (e.g. no memory for two 7B copies)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: dense bf16 of known GPUs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print train()'s settings line and progress")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.precision != "fp32" and device.type != "cuda":
        sys.exit(f"--precision {args.precision} needs --device cuda; use fp32 on {device.type}")

    if not args.no_peft:
        import peft  # the baseline only: a test/bench dependency, never a runtime one
    base, tokenizer, name = build_model(args)
    n_warm = args.warmup_steps * args.batch_size
    pairs = load_pairs(args.data, args.rows + n_warm, args.seed)
    warm_pairs, pairs = pairs[:n_warm], pairs[n_warm:]
    encoded = [train.encode_pair(tokenizer, p, r, args.max_seq_len) for p, r in pairs]
    lengths = [len(ids) for ids, _ in encoded]

    # Both sides start from identical copies of the same base weights.
    peft_model = None if args.no_peft else peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=SEVEN, task_type="CAUSAL_LM"))
    shape = flop_shape(base)
    ours_model = lora.add_lora(base, r=8, alpha=16, dropout=0.05, targets=SEVEN, verbose=False)
    n_lora = lora.count_parameters(ours_model)[0]
    if peft_model is not None:
        assert n_lora == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    flops_ours = training_flops(shape, lengths, [t - n for t, (_, n) in zip(lengths, encoded)], n_lora)
    flops_peft = training_flops(shape, lengths, lengths, n_lora)

    if warm_pairs:
        if peft_model is not None:
            peft_train(peft_model, tokenizer, warm_pairs, args, device)
        ours_train(ours_model, tokenizer, warm_pairs, args, device)
    # Timed in two halves, ordered peft-ours then ours-peft: on a shared machine the load drifts, and this
    # ABBA order cancels a steady drift instead of charging it all to whichever side runs second.
    half = len(pairs) // 2 // args.batch_size * args.batch_size or len(pairs)
    theirs, ours = {"seconds": 0.0, "tokens": 0, "padded_tokens": 0, "steps": 0}, {"seconds": 0.0, "tokens": 0,
                                                                                   "steps": 0}
    peak = {"p": 0.0, "o": 0.0}
    for chunk, order in ((pairs[:half], "po"), (pairs[half:], "op")):
        for side in order if chunk else "":
            if side == "p" and peft_model is None:
                continue
            reset_peak_memory(device)
            stats = (peft_train(peft_model, tokenizer, chunk, args, device) if side == "p"
                     else ours_train(ours_model, tokenizer, chunk, args, device))
            peak[side] = max(peak[side], peak_memory_gib(device))
            for k, v in stats.items():
                (theirs if side == "p" else ours)[k] += v

    ours_tok_s = ours["tokens"] / ours["seconds"]
    result = {"bench": "train", "model": name, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads", "precision": args.precision,
              "rows": len(pairs), "batch_size": args.batch_size, "micro_batch_tokens": args.micro_batch_tokens,
              "grad_checkpoint": args.grad_checkpoint, "compile": args.compile, "steps": ours["steps"],
              "tokens": ours["tokens"], "ours_tok_s": round(ours_tok_s, 1), "ours_s": round(ours["seconds"], 2),
              "ours_tflops_s": round(flops_ours / ours["seconds"] / 1e12, 3)}
    if peft_model is not None:
        assert ours["tokens"] == theirs["tokens"], "both sides must see the same non-pad tokens"
        peft_tok_s = theirs["tokens"] / theirs["seconds"]
        result.update({"peft_tok_s": round(peft_tok_s, 1), "ratio": round(ours_tok_s / peft_tok_s, 3),
                       "peft_s": round(theirs["seconds"], 2),
                       "peft_tflops_s": round(flops_peft / theirs["seconds"] / 1e12, 3),
                       "peft_pad_fraction": round(1 - theirs["tokens"] / theirs["padded_tokens"], 3)})
    if device.type == "cuda":
        result["ours_peak_mem_gib"] = round(peak["o"], 2)
        if peft_model is not None:
            result["peft_peak_mem_gib"] = round(peak["p"], 2)
        peak_tflops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                                if k in torch.cuda.get_device_name(device)), None)
        if peak_tflops:
            result["mfu_ours"] = round(flops_ours / ours["seconds"] / (peak_tflops * 1e12), 4)
            if peft_model is not None:
                result["mfu_peft"] = round(flops_peft / theirs["seconds"] / (peak_tflops * 1e12), 4)
            result["peak_tflops"] = peak_tflops
    else:
        result["peak_rss_gib"] = round(peak_memory_gib(device), 2)  # the whole process, both sides
    print(json.dumps(result))


if __name__ == "__main__":
    main()
