"""Decode benchmark: generate.generate against Hugging Face generate(do_sample=False), measured in one process.

Both decode the same GSM8K test prompts (rendered with the chat template) greedily, with the same batch size and
max_new_tokens, on the same model. Output tokens are counted up to (not including) each row's EOS, the same way for
both. Prints one JSON line with both throughputs and their ratio, and checks that the texts are identical.

    python bench/bench_decode.py                                  # SmolLM2-135M-Instruct, fp32, CPU
    python bench/bench_decode.py --max-new-tokens 256
    python bench/bench_decode.py --config qwen2.5-0.5b --device cuda --dtype bf16 --prompts 256 --batch-size 256

--config builds a randomly initialised model of a real shape (weights do not matter for speed); its tokenizer is
SmolLM2's when available, else a byte-level one.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from generate import generate  # noqa: E402
from train import render_prompt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, rope_theta=1e5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
}


def smollm2_path():
    script = os.path.join(HERE, "..", "..", "shared", "models", "smollm2.sh")
    out = subprocess.run(["bash", script], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def load(args, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if args.config:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or smollm2_path())
        shape = dict(SHAPES[args.config])
        config = AutoConfig.for_model(shape.pop("model_type"), vocab_size=len(tokenizer), **shape,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        name = f"random {args.config}"
    else:
        path = args.model or smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        name = os.path.basename(path.rstrip("/"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer, name


def hf_generate(model, tokenizer, prompts, batch_size, max_new_tokens):
    """The usual way: left-padded batches through model.generate; returns (texts, output tokens)."""
    tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [tokenizer.eos_token_id])
    texts, n_tokens = [], 0
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            ids = row[:next((i for i, t in enumerate(row) if t in eos), len(row))]
            n_tokens += len(ids)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, n_tokens


def ours(model, tokenizer, prompts, batch_size, max_new_tokens):
    results = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, details=True)
    return [r["text"] for r in results], sum(r["completion_tokens"] for r in results)


def timed(fn, device, *args):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct from ../shared/models/smollm2.sh)")
    p.add_argument("--config", choices=sorted(SHAPES), help="random model of this shape instead of --model")
    p.add_argument("--tokenizer", help="tokenizer folder for --config (default: SmolLM2's)")
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "gsm8k", "test.jsonl"))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tokenizer, name = load(args, device, dtype)
    questions = [json.loads(line)["question"] for line in open(args.data)]
    questions = (questions * (args.prompts // len(questions) + 1))[:args.prompts]
    prompts = [render_prompt(tokenizer, q) for q in questions]

    # warm up both (allocator, kernels, lazy imports) on a few prompts, outside the timed runs
    hf_generate(model, tokenizer, prompts[:4], 4, 4)
    ours(model, tokenizer, prompts[:4], 4, 4)
    (hf_texts, hf_tokens), hf_seconds = timed(hf_generate, device, model, tokenizer, prompts, args.batch_size,
                                              args.max_new_tokens)
    (our_texts, our_tokens), our_seconds = timed(ours, device, model, tokenizer, prompts, args.batch_size,
                                                 args.max_new_tokens)
    same = sum(a == b for a, b in zip(hf_texts, our_texts))
    print(json.dumps({
        "bench": "decode", "model": name, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "prompts": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "ours_tok_s": round(our_tokens / our_seconds, 1), "hf_tok_s": round(hf_tokens / hf_seconds, 1),
        "ratio": round((our_tokens / our_seconds) / (hf_tokens / hf_seconds), 2),
        "ours_tokens": our_tokens, "hf_tokens": hf_tokens, "ours_seconds": round(our_seconds, 2),
        "hf_seconds": round(hf_seconds, 2), "identical_texts": f"{same}/{len(prompts)}"}))


if __name__ == "__main__":
    main()
