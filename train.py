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


LENGTH_BUCKET = 64  # with --compile, padded widths are multiples of this, so a few shapes repeat


def bucket(length, multiple=LENGTH_BUCKET):
    return -(-length // multiple) * multiple


def collate(examples, pad_id, device, width_multiple=1):
    """Right-padded input ids and a mask of the positions whose next token is a response token. Right padding
    needs no attention mask: under causal attention a real token never sees the pads that follow it, so padding
    to a bucketed width (width_multiple) changes nothing but the shape."""
    width = bucket(max(len(ids) for ids, _ in examples), width_multiple)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    target_mask = torch.zeros((len(examples), width - 1), dtype=torch.bool)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        target_mask[row, n_prompt - 1:len(ids) - 1] = True
    return input_ids.to(device), target_mask.to(device)


# -----------------------------------------------------------------------------
# Loss: the lm_head runs only on positions that predict a response token. The vocabulary projection is the
# largest single matmul of a small model, and prompt positions would be thrown away anyway. It runs in chunks of
# rows, each chunk's loss and gradient made and its logits freed before the next, so no [tokens, vocab] fp32
# logits tensor ever exists: at a 152k vocabulary that tensor alone would be 0.6 MB per token.

LOSS_CHUNK_BYTES = 2 ** 28  # fp32 logits of one chunk: 256 MiB


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross-entropy(hidden @ weight^T + bias, targets), chunk by chunk. The gradient w.r.t. hidden
    is made in the forward pass from each chunk's softmax (softmax - one-hot), so backward only scales it; the
    frozen lm_head gets no gradient. Logits are computed as the plain lm_head would (under autocast: in bf16) and
    the softmax in fp32, like F.cross_entropy(logits.float())."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, want_grad):
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = F.linear(h, weight, bias)
            compute_dtype = logits.dtype
            logp = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
            del logits
            logp -= torch.logsumexp(logp, dim=-1, keepdim=True)  # log-softmax, in place
            rows = torch.arange(t.shape[0], device=t.device)
            total -= logp[rows, t].sum()
            if want_grad:
                grad_logits = logp.exp_()  # softmax
                grad_logits[rows, t] -= 1
                grad_hidden[start:start + chunk_rows] = grad_logits.to(compute_dtype) @ weight.to(compute_dtype)
            del logp
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        # a bf16 gradient times the fp32 scalar: computed in fp32, rounded once
        return grad_hidden * grad_total, None, None, None, None, None


def chunked_cross_entropy_sum(hidden, head, targets, chunk_bytes=LOSS_CHUNK_BYTES):
    """Summed cross-entropy of head(hidden) against targets without materialising all logits at once."""
    if not isinstance(head, torch.nn.Linear) or head.weight.requires_grad:
        # an unusual or trainable output layer: the plain computation (gradients flow to everything)
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    chunk_rows = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_rows, want_grad)


def response_loss_sum(model, input_ids, target_mask, body=None):
    """Summed cross-entropy over the masked (response) positions. `body` is the decoder to run, by default
    model.base_model (train() passes a compiled one with --compile)."""
    hidden = (model.base_model if body is None else body)(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1][target_mask]  # gather the labelled positions first: the lm_head sees only these
    targets = input_ids[:, 1:][target_mask]
    return chunked_cross_entropy_sum(hidden, model.get_output_embeddings(), targets)


# -----------------------------------------------------------------------------
# Micro-batch size from memory: on CUDA, `micro_batch_tokens="auto"` takes the largest token budget whose
# activations fit in the free memory. Bytes per token per decoder layer were measured with autograd's
# saved-tensor hooks on Qwen2 and Llama shapes (frozen base, LoRA on all projections; tests check the estimate
# stays above a measurement) and are rounded up: about e(13 H + 3.5 I) for element size e, plus (e + 1)(6 H + I)
# for the dropout masks and dropped inputs of the seven LoRA branches. With checkpointing only each layer's input
# (e H) is kept, and one layer at a time is recomputed. Eager (non-SDPA) attention adds its heads x length score
# matrices.

def activation_bytes_per_token(model_config, element_bytes=2, lora_dropout=0.0, grad_checkpoint=False,
                               max_seq_len=1024):
    """Estimated device memory one training token needs during forward + backward (excluding weights)."""
    hidden = model_config.hidden_size
    layers = model_config.num_hidden_layers
    inner = getattr(model_config, "intermediate_size", None) or 4 * hidden
    per_layer = element_bytes * (13 * hidden + 3.5 * inner)
    if lora_dropout > 0:
        per_layer += (element_bytes + 1) * (6 * hidden + inner)
    if getattr(model_config, "_attn_implementation", "sdpa") == "eager":
        per_layer += (4 + 2 * element_bytes) * model_config.num_attention_heads * max_seq_len
    outside_layers = 16 * hidden  # embeddings, final norm, gathered hidden states and their gradient
    # kept for backward (with checkpointing: each layer's input, and one layer recomputed at a time), plus one
    # layer's worth of gradient buffers while backward runs through it
    kept = layers * element_bytes * hidden + per_layer if grad_checkpoint else layers * per_layer
    return int(kept + per_layer + outside_layers)


def auto_micro_batch_tokens(free_bytes, model_config, **shape):
    """The largest micro-batch (tokens, a multiple of 256, at least 256) whose activations fit in free_bytes,
    keeping 15% + 1.5 GiB aside for the loss chunks, workspaces and fragmentation."""
    usable = 0.85 * free_bytes - 1.5 * 2 ** 30
    return max(256, int(usable // activation_bytes_per_token(model_config, **shape)) // 256 * 256)


def free_device_memory(device):
    """Bytes free on a CUDA device, counting memory PyTorch's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def parse_micro_batch_tokens(value):
    """'auto' or a positive number of tokens, from the command line or a caller."""
    if value == "auto":
        return value
    try:
        tokens = int(value)
    except (TypeError, ValueError):
        tokens = 0
    if isinstance(value, float) or tokens < 1:
        raise ValueError(f"micro-batch tokens must be 'auto' or a positive whole number of tokens, got {value!r}")
    return tokens


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


def cast_frozen_weights(model, dtype):
    """Cast the frozen (base) weights to the autocast dtype once. Left in fp32, autocast would cast every frozen
    weight again on every call, and keep each cast copy for backward. Trainable (LoRA) weights stay fp32: they are
    the master weights AdamW updates. Returns the number of parameters cast."""
    cast = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += p.numel()
    return cast


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


def _read_checkpoint(path):
    """The checkpoint at path, or None. It is a file in the run directory, which anyone may have replaced, so it is
    read with weights_only=True: tensors, numbers, strings and containers, never an arbitrary pickled object (whose
    unpickling could run code)."""
    if not path or not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign pickle, a torn or corrupt file: never trusted, never executed
        raise TrainingError(f"{path}: not a training checkpoint that can be read safely ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}). Delete it to restart this fine-tune from its first "
                            f"step; nothing else is lost.") from None


def _load_checkpoint(path, plan, params, optimizer, scaler):
    """Rank 0 reads the checkpoint, every rank restores it. None if there is none."""
    state = dist.from_rank0(lambda: _read_checkpoint(path))
    if state is None:
        return None
    if not isinstance(state, dict) or not {"plan", "step", "params", "optimizer"} <= set(state):
        raise TrainingError(f"{path} is not a training checkpoint of this program; delete it to restart this "
                            f"fine-tune from its first step")
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


def _lockstep(step_rows, my_rows, micro_batches, lengths, padded_lengths, micro_batch_tokens):
    """Under FSDP: pad this rank's micro-batches with zero-weight copies of one row of the step up to the most any
    rank has, so that all ranks make the same sequence of forward and backward calls. Shares are dealt as in
    train() (rows sorted by length) and cut by padded length."""
    ordered = sorted(step_rows, key=lambda i: lengths[i])
    most = max(len(split_micro_batches(ordered[r::dist.world_size()], padded_lengths, micro_batch_tokens))
               for r in range(dist.world_size()))
    padding = most - len(micro_batches)
    return micro_batches + [[(my_rows or ordered)[0]]] * padding, [1.0] * len(micro_batches) + [0.0] * padding


# Activation checkpointing: each decoder layer keeps only its input and is recomputed in backward, through the
# model's own Hugging Face switch (non-reentrant, so the frozen base needs no inputs that require grad, and dropout
# masks are replayed from the saved RNG state).

def set_grad_checkpointing(model, enabled):
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainingError(f"{type(model).__name__} does not support --grad-checkpoint")
    if enabled:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        if hasattr(model, "_require_grads_hook"):  # set by enable; not needed once checkpointing is off
            model.disable_input_require_grads()


# -----------------------------------------------------------------------------
# The loop

def train(model, tokenizer, pairs, *, epochs=3, lr=2e-4, batch_size=16, min_steps=0, max_steps=None,
          micro_batch_tokens="auto", warmup_frac=0.1, weight_decay=0.0, grad_clip=1.0, precision=None, seed=0,
          max_seq_len=1024, checkpoint_path=None, checkpoint_every_s=60.0, grad_checkpoint=False, compile=False,
          progress=True, on_step=None):
    """Train the model's LoRA parameters on (prompt, response) pairs. Returns a dict of statistics.

    `epochs` is raised until the run takes at least `min_steps` optimizer steps: a seed set of 50 rows at 3 epochs
    would otherwise get a handful of updates and stay unlearned, and LLM2LLM needs a student that has learned its
    seed set, so that the examples it still gets wrong are real mistakes. `max_steps`, if given, replaces both:
    exactly that many optimizer steps, cycling through the data in epochs.

    micro_batch_tokens: padded tokens per forward/backward, or "auto": on CUDA the most that fit in free memory,
    on CPU 4096. grad_checkpoint: recompute each decoder layer in backward instead of keeping its activations.
    compile: torch.compile the decoder, with padded lengths bucketed to multiples of 64 so shapes repeat. On CUDA
    with bf16/fp16, frozen fp32 weights are cast to that dtype once (see cast_frozen_weights).

    on_step(step, total): called after each optimizer step (step counts from 1) and before a checkpoint can be
    written, so a checkpoint past a step always follows that step's call; the loop evaluates the student mid-way
    through it (--mistakes early:F). Its time is not counted in train_seconds, and the model is put back in
    training mode after it."""
    if not pairs:
        raise TrainingError("no training examples")
    params = [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]
    if not params:
        raise TrainingError("the model has no LoRA adapters: call lora.add_lora(model) before train()")
    device = params[0].device
    precision = precision or default_precision(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"unknown precision {precision!r}: choose fp32, bf16 or fp16")
    try:
        micro_batch_tokens = parse_micro_batch_tokens(micro_batch_tokens)
    except ValueError as e:
        raise TrainingError(str(e))
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
    sharded = is_sharded(model)
    width_multiple = LENGTH_BUCKET if compile else 1
    padded_lengths = [bucket(n, width_multiple) for n in lengths]  # what a row costs in a micro-batch
    memory_note = ""
    if device.type == "cuda" and precision != "fp32" and not sharded:  # FSDP casts its own gathered shards
        cast = cast_frozen_weights(model, torch.bfloat16 if precision == "bf16" else torch.float16)
        memory_note += f", {cast:,} frozen weights cast to {precision} once" if cast else ""
    if micro_batch_tokens == "auto" and device.type == "cuda":
        first = lora_modules(model)[0][1]
        shape = dict(element_bytes=4 if precision == "fp32" else 2, grad_checkpoint=grad_checkpoint,
                     lora_dropout=first.lora_dropout.p if isinstance(first.lora_dropout, torch.nn.Dropout) else 0.0,
                     max_seq_len=max(padded_lengths))
        free = free_device_memory(device)
        micro_batch_tokens = auto_micro_batch_tokens(free, model.config, **shape)
        memory_note += (f", auto micro-batch from {free / 2 ** 30:.1f} GiB free at "
                        f"~{activation_bytes_per_token(model.config, **shape) / 2 ** 10:.0f} KiB per token")
        if dist.world_size() > 1:  # every rank must split a step the same way (FSDP runs them in lockstep)
            micro_batch_tokens = dist.broadcast_object(micro_batch_tokens)
    elif micro_batch_tokens == "auto":
        micro_batch_tokens = 4096
    micro_batch_tokens = max(micro_batch_tokens, max(padded_lengths))  # a single long row always fits
    warmup = max(1, int(warmup_frac * len(steps)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # fused on CUDA; on CPU the foreach kernels, not a Python loop over the hundreds of small LoRA tensors
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999),
                                  fused=device.type == "cuda", foreach=device.type != "cuda")
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
              + memory_note + (", activation checkpointing" if grad_checkpoint else "")
              + (", compiled" if compile else "") + (f", resuming at step {start_step}" if start_step else ""))

    model.train()
    if grad_checkpoint:
        set_grad_checkpointing(model, True)
    body = torch.compile(model.base_model) if compile else model.base_model
    bar = tqdm(total=len(steps), initial=start_step, desc="train", disable=not progress, leave=False)
    t0, last_save = time.time(), time.time()
    paused = 0.0  # seconds spent in on_step
    tokens_at_start = tokens_seen
    for step in range(start_step, len(steps)):
        lr_now = lr_at(step, len(steps), lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        # this rank's share of the step; the loss is still divided by the response tokens of the WHOLE step (every
        # rank holds the plan, so the count needs no communication) and the gradients are summed over ranks
        my_rows = dist.my_share(sorted(steps[step], key=lambda i: lengths[i]))
        micro_batches = split_micro_batches(my_rows, padded_lengths, micro_batch_tokens)
        n_targets = sum(lengths[i] - examples[i][1] for i in steps[step])
        weights = [1.0] * len(micro_batches)
        if sharded:  # every forward is a collective (FSDP gathers each layer): all ranks run as many micro-batches
            micro_batches, weights = _lockstep(steps[step], my_rows, micro_batches, lengths, padded_lengths,
                                                micro_batch_tokens)
        step_loss = torch.zeros((), device=device)
        for rows, weight in zip(micro_batches, weights):
            input_ids, target_mask = collate([examples[i] for i in rows], pad_id, device, width_multiple)
            with autocast_context(device, precision):
                loss = response_loss_sum(model, input_ids, target_mask, body) / n_targets * weight  # x * 1.0 is exact
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
        if on_step is not None:
            t_hook = time.time()
            on_step(step + 1, len(steps))
            model.train()
            paused += time.time() - t_hook
        # rank 0's clock decides, so all ranks take part in gathering the RNG states at the same step
        save_now = time.time() - last_save >= checkpoint_every_s and step + 1 < len(steps)
        if checkpoint_path and (dist.broadcast_object(save_now) if dist.world_size() > 1 else save_now):
            _save_checkpoint(checkpoint_path, plan, step + 1, params, optimizer, scaler, tokens_seen, loss_history)
            last_save = time.time()
    bar.close()
    if grad_checkpoint:
        set_grad_checkpointing(model, False)
    model.eval()
    return {"steps": len(steps), "epochs": epochs, "train_tokens": tokens_seen,
            "train_seconds": time.time() - t0 - paused,
            "final_loss": loss_history[-1] if loss_history else None, "loss_history": loss_history,
            "resumed_at_step": start_step}
