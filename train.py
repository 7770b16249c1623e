"""Fine-tune a LoRA student on (prompt, response) pairs: a hand-written PyTorch loop, CPU or CUDA.

What one call of `train` does:
  - renders every prompt with the tokenizer's chat template (or a plain template), appends EOS to every response,
    and puts the loss on response tokens only;
  - groups rows of similar length, so micro-batches are cut by a token budget instead of padded to a fixed length;
  - normalises the loss by the number of response tokens in the whole accumulated step (not per micro-batch), so
    a long answer weighs the same whether it shares its micro-batch or not;
  - runs AdamW on the LoRA parameters only, linear warmup then cosine decay, gradient clipping;
  - precision: bf16 autocast on CUDA by default, fp16 autocast + GradScaler as an option, plain fp32 on CPU;
  - stops with a clear error on a NaN/inf loss, and, given a checkpoint path, saves adapter + optimizer + RNG state
    now and then so a killed run resumes bit-for-bit where it stopped;
  - under torchrun (see dist.py) it is data-parallel: every rank holds the whole plan, takes its share of each
    step's rows, and the LoRA gradients are summed over ranks before clipping and the AdamW step, so every rank
    applies the same update. Rank 0 alone writes the checkpoint.

Usage (llm2llm.py is the real caller):
    from lora import add_lora
    from train import train
    add_lora(model, r=8, alpha=16)
    stats = train(model, tokenizer, [("What is 2+3?", "2+3=5\\n#### 5")], epochs=3, lr=2e-4)
"""
import contextlib
import hashlib
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm.auto import tqdm

import dist
from generate import is_sharded
from lora import lora_modules


class TrainingError(RuntimeError):
    pass


# -----------------------------------------------------------------------------
# Rendering: one function shared by training, evaluation and the teacher server, so the student is always asked
# in exactly the form it was trained on.

PLAIN_TEMPLATE = "### Question:\n{prompt}\n\n### Answer:\n"


def render_prompt(tokenizer, user_text, system=None):
    """The prompt as the model sees it, up to where the answer starts."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    return bos + (f"{system}\n\n" if system else "") + PLAIN_TEMPLATE.format(prompt=user_text)


def encode_pair(tokenizer, prompt, response, max_seq_len):
    """Token ids of prompt + response + EOS and the prompt length. Prompt and response are tokenised apart so the
    prompt ids are exactly those the decoder is given at evaluation time."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_seq_len]
    return ids, len(prompt_ids)


# -----------------------------------------------------------------------------
# Batching: length-grouped steps, token-budget micro-batches

def plan_steps(lengths, batch_size, epochs, seed):
    """A list of optimizer steps, each a list of row indices. Rows are shuffled, then sorted by length inside
    'mega-batches' of 64 steps so each step holds rows of similar length (little padding) while step order stays
    random. Fixed by `seed`, so a resumed run replays exactly the same plan."""
    rng = random.Random(seed)
    steps = []
    for _ in range(epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        mega = batch_size * 64
        epoch_steps = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: lengths[i])
            epoch_steps += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch_steps)
        steps += epoch_steps
    return steps


def split_micro_batches(step_rows, lengths, token_budget):
    """Cut one step's rows (sorted by length) into micro-batches whose padded size rows x longest <= token_budget."""
    rows = sorted(step_rows, key=lambda i: lengths[i])
    micro, current = [], []
    for i in rows:
        if current and (len(current) + 1) * lengths[i] > token_budget:
            micro.append(current)
            current = []
        current.append(i)
    return micro + [current] if current else micro


def collate(examples, pad_id, device):
    """Right-padded input ids and a mask of the positions whose next token is a response token. Right padding
    needs no attention mask: under causal attention a real token never sees the pads that follow it."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    target_mask = torch.zeros((len(examples), width - 1), dtype=torch.bool)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        target_mask[row, n_prompt - 1:len(ids) - 1] = True
    return input_ids.to(device), target_mask.to(device)


# -----------------------------------------------------------------------------
# Loss: the lm_head runs only on positions that predict a response token. The vocabulary projection is the
# largest single matmul of a small model, and prompt positions would be thrown away anyway. Its fp32 logits are the
# largest tensor of a step (tokens x vocab: 8.6 GiB for 16k response tokens of a 152k vocabulary), so beyond
# LOSS_CHUNK_TOKENS positions they are computed a chunk at a time under activation checkpointing: each chunk's
# logits live only while its loss (and, in backward, its gradient) is computed. The sum is the same loss.

LOSS_CHUNK_TOKENS = 4096


def _chunk_loss_sum(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def response_loss_sum(model, input_ids, target_mask, chunk_tokens=LOSS_CHUNK_TOKENS):
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1][target_mask]
    targets = input_ids[:, 1:][target_mask]
    head = model.get_output_embeddings()
    if hidden.shape[0] <= chunk_tokens:  # the usual case: one chunk, nothing to recompute
        return _chunk_loss_sum(head, hidden, targets)
    return sum(torch.utils.checkpoint.checkpoint(_chunk_loss_sum, head, h, t, use_reentrant=False)
               for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)))


# -----------------------------------------------------------------------------
# Learning rate: linear warmup, then cosine decay to 10% of the peak

def lr_at(step, total_steps, peak_lr, warmup_steps):
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# -----------------------------------------------------------------------------
# Precision

def autocast_context(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise TrainingError(f"--precision {precision} needs a CUDA device; use fp32 on {device.type}")
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def default_precision(device):
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else (
        "fp16" if device.type == "cuda" else "fp32")


# -----------------------------------------------------------------------------
# Resumable state: small (adapters + AdamW moments), written atomically

def _rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _save_checkpoint(path, plan, step, params, optimizer, scaler, tokens, loss_history):
    # every rank's RNG state (its dropout masks), gathered on rank 0; rank 0's also under the one-process keys
    rank_rngs = dist.gather_to_rank0(_rng_state())
    if not dist.is_main():
        return
    state = {"plan": plan, "step": step, "params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "tokens": tokens,
             "loss_history": loss_history, "cpu_rng": rank_rngs[0][0], "cuda_rng": rank_rngs[0][1],
             "rank_rngs": rank_rngs if len(rank_rngs) > 1 else None}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_checkpoint(path, plan, params, optimizer, scaler):
    """Rank 0 reads the checkpoint, every rank restores it. None if there is none."""
    state = dist.from_rank0(lambda: torch.load(path, map_location="cpu", weights_only=False)
                            if path and os.path.exists(path) else None)
    if state is None:
        return None
    if state.get("plan") != plan:
        raise TrainingError(f"{path} is a checkpoint of different training data or settings; delete it to start "
                            f"this training from the beginning")
    with torch.no_grad():
        for p, saved in zip(params, state["params"], strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    # each rank its own RNG state; resumed on another number of ranks, the ranks beyond 0 keep their seeded RNG
    rngs = state.get("rank_rngs") or [(state["cpu_rng"], state["cuda_rng"])]
    mine = rngs[dist.rank()] if len(rngs) == dist.world_size() else rngs[0] if dist.is_main() else None
    if mine is not None:
        torch.set_rng_state(mine[0])
        if mine[1] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine[1])
    return state["step"], state["tokens"], state["loss_history"]


# -----------------------------------------------------------------------------
# Data parallel: one all-reduce per optimizer step of every LoRA gradient and the step loss, flattened into one
# buffer. A rank whose share of a short last step is empty contributes zeros. The sum runs before unscaling and
# clipping, so every rank clips and steps on the same full-step gradient (fp16 overflow on one rank shows on all).

def _sum_over_ranks(params, step_loss):
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [step_loss.reshape(1).to(grads[0].dtype)])
    dist.all_reduce_sum(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    step_loss.copy_(flat[-1])


def _lockstep(step_rows, my_rows, micro_batches, lengths, micro_batch_tokens):
    """Under FSDP: pad this rank's micro-batches with zero-weight copies of one row of the step up to the most any
    rank has, so that all ranks make the same sequence of forward and backward calls."""
    ordered = sorted(step_rows, key=lambda i: lengths[i])
    most = max(len(split_micro_batches(ordered[r::dist.world_size()], lengths, micro_batch_tokens))
               for r in range(dist.world_size()))
    padding = most - len(micro_batches)
    return micro_batches + [[(my_rows or ordered)[0]]] * padding, [1.0] * len(micro_batches) + [0.0] * padding


# -----------------------------------------------------------------------------
# The loop

def train(model, tokenizer, pairs, *, epochs=3, lr=2e-4, batch_size=16, min_steps=0, max_steps=None,
          micro_batch_tokens=4096, warmup_frac=0.1, weight_decay=0.0, grad_clip=1.0, precision=None, seed=0,
          max_seq_len=1024, checkpoint_path=None, checkpoint_every_s=60.0, progress=True):
    """Train the model's LoRA parameters on (prompt, response) pairs. Returns a dict of statistics.

    `epochs` is raised until the run takes at least `min_steps` optimizer steps: a seed set of 50 rows at 3 epochs
    would otherwise get a handful of updates and stay unlearned, and LLM2LLM needs a student that has learned its
    seed set, so that the examples it still gets wrong are real mistakes. `max_steps`, if given, replaces both:
    exactly that many optimizer steps, cycling through the data in epochs."""
    if not pairs:
        raise TrainingError("no training examples")
    params = [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]
    if not params:
        raise TrainingError("the model has no LoRA adapters: call lora.add_lora(model) before train()")
    device = params[0].device
    precision = precision or default_precision(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"unknown precision {precision!r}: choose fp32, bf16 or fp16")
    torch.manual_seed(seed + 1_000_003 * dist.rank())  # dropout masks, one stream per rank; restored on resume

    examples = [encode_pair(tokenizer, prompt, response, max_seq_len) for prompt, response in pairs]
    n_truncated = sum(len(ids) == max_seq_len for ids, _ in examples)  # at the limit: cut, or exactly that long
    if any(n_prompt >= len(ids) for ids, n_prompt in examples):
        raise TrainingError(f"a prompt is {max_seq_len} tokens or longer, leaving no room for its answer: "
                            f"raise --max-seq-len")
    lengths = [len(ids) for ids, _ in examples]
    steps_per_epoch = len(plan_steps(lengths, batch_size, 1, seed))
    if max_steps is not None:  # enough whole epochs of the usual plan, cut at max_steps
        epochs = math.ceil(max_steps / steps_per_epoch)
    else:
        epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    steps = plan_steps(lengths, batch_size, epochs, seed)[:max_steps]
    micro_batch_tokens = max(micro_batch_tokens, max(lengths))  # a single long row always fits
    warmup = max(1, int(warmup_frac * len(steps)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start_step, tokens_seen, loss_history = 0, 0, []
    # what a checkpoint must match to be resumed: the data (as token lengths), the step plan and the optimizer
    plan = hashlib.sha256(json.dumps([lengths, [sum(ids) for ids, _ in examples], steps, lr, weight_decay,
                                      grad_clip, warmup, precision]).encode()).hexdigest()
    resumed = _load_checkpoint(checkpoint_path, plan, params, optimizer, scaler)
    if resumed is not None:
        start_step, tokens_seen, loss_history = resumed
    progress = progress and dist.is_main()
    if progress:
        print(f"training on {len(pairs)} examples ({sum(lengths):,} tokens, {n_truncated} truncated to "
              f"{max_seq_len}): {len(steps)} steps of {batch_size} rows (~{sum(lengths) * epochs // len(steps):,} "
              f"tokens/step, {epochs} epochs), micro-batches of <= {micro_batch_tokens} tokens, {precision}, peak lr {lr:g}"
              + (f", resuming at step {start_step}" if start_step else ""))

    sharded = is_sharded(model)
    model.train()
    bar = tqdm(total=len(steps), initial=start_step, desc="train", disable=not progress, leave=False)
    t0, last_save = time.time(), time.time()
    tokens_at_start = tokens_seen
    for step in range(start_step, len(steps)):
        lr_now = lr_at(step, len(steps), lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        # this rank's share of the step; the loss is still divided by the response tokens of the WHOLE step (every
        # rank holds the plan, so the count needs no communication) and the gradients are summed over ranks
        my_rows = dist.my_share(sorted(steps[step], key=lambda i: lengths[i]))
        micro_batches = split_micro_batches(my_rows, lengths, micro_batch_tokens)
        n_targets = sum(lengths[i] - examples[i][1] for i in steps[step])
        weights = [1.0] * len(micro_batches)
        if sharded:  # every forward is a collective (FSDP gathers each layer): all ranks run as many micro-batches
            micro_batches, weights = _lockstep(steps[step], my_rows, micro_batches, lengths, micro_batch_tokens)
        step_loss = torch.zeros((), device=device)
        for rows, weight in zip(micro_batches, weights):
            input_ids, target_mask = collate([examples[i] for i in rows], pad_id, device)
            with autocast_context(device, precision):
                loss = response_loss_sum(model, input_ids, target_mask) / n_targets * weight  # x * 1.0 is exact
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.detach()
        tokens_seen += sum(lengths[i] for i in steps[step])
        if dist.world_size() > 1:
            _sum_over_ranks(params, step_loss)
        step_loss = step_loss.item()
        if not math.isfinite(step_loss):
            raise TrainingError(f"loss became {step_loss} at step {step + 1}/{len(steps)} (lr {lr_now:.3g}): "
                                f"lower --lr, or use --precision bf16/fp32 instead of fp16")
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_history.append(step_loss)
        elapsed = time.time() - t0
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{(tokens_seen - tokens_at_start) / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        # rank 0's clock decides, so all ranks take part in gathering the RNG states at the same step
        save_now = time.time() - last_save >= checkpoint_every_s and step + 1 < len(steps)
        if checkpoint_path and (dist.broadcast_object(save_now) if dist.world_size() > 1 else save_now):
            _save_checkpoint(checkpoint_path, plan, step + 1, params, optimizer, scaler, tokens_seen, loss_history)
            last_save = time.time()
    bar.close()
    model.eval()
    return {"steps": len(steps), "epochs": epochs, "train_tokens": tokens_seen, "train_seconds": time.time() - t0,
            "final_loss": loss_history[-1] if loss_history else None, "loss_history": loss_history,
            "resumed_at_step": start_step}
