"""generate.py: loading a causal LM and decoding with it (prefill, decode step, sampling, KV cache).

Used by the loop (evaluation), by the embedded teacher server (serve.py) and by bench/. Run it directly to complete
a prompt with a local model:

    python generate.py --model PATH_OR_ID --prompt "What is 12 * 7?" [--max-new-tokens 64]

Greedy decoding is token-for-token the same as Hugging Face generate(do_sample=False); tests/test_generate.py checks
that against HF.
"""
import argparse
import os
import sys
from collections import deque

import torch
import torch.nn.functional as F

DEFAULT_STUDENT = "Qwen/Qwen2.5-0.5B-Instruct"


class ModelLoadError(ValueError):
    """A model that cannot be loaded or a device that does not exist: the message says what to do."""

# -----------------------------------------------------------------------------
# Models

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def load_model(name, device=None, precision=None, role="model", dtype=None):
    """A causal LM and its tokenizer in eval mode, in the precision the device wants (or `dtype`). Used for the
    student, the embedded teacher and `llm2llm.py serve`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = device or resolve_device("auto")
    looks_local = os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or name.count("/") > 1
    if looks_local and not os.path.isdir(name):
        raise ModelLoadError(f"could not load {role} {name}: no such folder. Give a local model folder (config.json, weights, tokenizer) "
                       f"or a Hugging Face model id such as {DEFAULT_STUDENT}")
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" or precision == "fp32" else (
            torch.float16 if precision == "fp16" else torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load {role} {name!r}: {str(e).splitlines()[0]}\nOffline? Pass a local folder.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer



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
            and not getattr(config, "use_sliding_window", False) and not is_sharded(model))


def is_sharded(model):
    """True when FSDP (llm2llm.py --fsdp) shards the model's layers: their weights exist whole only inside each
    layer's own forward call, which the fast path bypasses, so such a model decodes through its own forward."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _eos_ids(model, tokenizer):
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


# -----------------------------------------------------------------------------
# Sampling on the model's device. Each row draws its randomness from a counter-based hash of (its seed, how many
# tokens it has generated), not from a shared generator, so a row samples the same text whatever else shares its
# batch, and no row ever waits for the host. The hash works on int64 tensors holding 32-bit values; both multipliers
# are below 2**31, so no product overflows. It also runs on plain Python ints (seed_key).

_M32 = 0xFFFFFFFF


def _hash32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def seed_key(seed):
    """A row's 32-bit sampling key from any integer seed (negative and 64-bit seeds included)."""
    s = int(seed) % (1 << 64)
    return _hash32(_hash32(s & _M32) ^ (s >> 32))


def _uniforms(keys, counters):
    """One uniform in [0, 1) per row from its key and counter (24 random bits: exact in float32)."""
    h = _hash32(keys ^ _hash32(counters & _M32))
    h = _hash32((h + keys) & _M32)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _pick_tokens(logits, temperature, top_p, keys, counters, sample=True):
    """Greedy where a row's temperature is 0, else nucleus sampling by inverse CDF over the sorted probabilities that
    top-p keeps. logits (B, V); temperature, top_p float (B,); keys, counters int64 (B,), all on the logits' device.
    sample=False (every row greedy) skips the sort. Nothing here reads a value back to the host."""
    greedy = logits.argmax(dim=-1)
    if not sample:
        return greedy
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / t[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
    kept = (sorted_probs * keep).cumsum(dim=-1)
    target = _uniforms(keys, counters) * kept[:, -1]
    index = torch.minimum((kept <= target[:, None]).sum(dim=-1), keep.sum(dim=-1) - 1)
    sampled = order.gather(1, index[:, None])[:, 0]
    return torch.where(temperature > 0, sampled, greedy)


def _row_sampling(n_rows, temperature, top_p, keys, device):
    """Per-row sampling tensors for a batch that shares one temperature and top_p."""
    return (torch.full((n_rows,), float(temperature), device=device), torch.full((n_rows,), float(top_p), device=device),
            torch.tensor(keys, dtype=torch.long, device=device))


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
             stop=None, details=False, prefill_tokens=2048, static=None):
    """Complete each rendered prompt. Returns only the completions, in input order: strings, or with details=True
    dicts {text, prompt_tokens, completion_tokens, finish_reason ('stop' | 'length')}. Temperature 0 is greedy and
    token-for-token the same as Hugging Face generate(do_sample=False). `seed` is an int or one int per prompt.

    static: decode Llama-family models through a DecodeSession (fixed shapes, graph-captured on CUDA) instead of
    the compacting batch loop. Default: on CUDA only; on CPU the compacting loop is faster. Other architectures
    always use their own forward and cache."""
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
    if fast and (device.type == "cuda" if static is None else static):
        outputs = _generate_static(model, tokenizer, id_lists, seeds, len(prefix), prefix_cache, max_new_tokens,
                                   batch_size, temperature, top_p, stop, prefill_tokens)
    else:
        order = sorted(range(len(prompts)), key=lambda i: len(id_lists[i]))
        outputs = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            suffixes = [id_lists[i][len(prefix):] for i in batch]
            run = _run_batch_fast if fast else _run_batch_hf
            for i, out in zip(batch, run(model, suffixes, prefix_cache, len(prefix), max_new_tokens, temperature,
                                         top_p, [seed_key(seeds[i]) for i in batch], eos, pad_id, tokenizer, stop,
                                         prefill_tokens, device)):
                outputs[i] = out
    results = [completion(tokenizer, token_ids, reason, stop, len(ids))
               for ids, (token_ids, reason) in zip(id_lists, outputs)]
    return results if details else [r["text"] for r in results]


def completion(tokenizer, token_ids, finish_reason, stop, prompt_tokens):
    """A finished row as the dict generate(details=True) returns: its text cut at the first stop string."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in stop or () if s in text), default=-1)
    return {"text": text[:cut] if cut >= 0 else text, "prompt_tokens": prompt_tokens,
            "completion_tokens": len(token_ids), "finish_reason": finish_reason}


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


def _run_batch_fast(model, suffixes, prefix_cache, n_prefix, max_new_tokens, temperature, top_p, keys, eos,
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
    temps, tops, keys = _row_sampling(n_rows, temperature, top_p, keys, device)
    slot = n_prefix + width
    for step in range(max_new_tokens):
        tokens = _pick_tokens(logits, temps, tops, keys, torch.full_like(keys, step), sample=temperature > 0)
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
            temps, tops, keys = temps[index], tops[index], keys[index]
            active = [active[j] for j in keep]
        key_mask[:, slot] = True
        hidden = _llama_forward(model, tokens[:, None], next_pos[:, None], cache, slice(None), slot,
                                key_mask[:, :slot + 1])
        logits = model.get_output_embeddings()(hidden).float()
        next_pos, slot = next_pos + 1, slot + 1
    return state.results()


def _run_batch_hf(model, suffixes, prefix_cache, n_prefix, max_new_tokens, temperature, top_p, keys, eos,
                  pad_id, tokenizer, stop, prefill_tokens, device):
    """Any causal LM through its own forward and cache (GPT-2 and friends). Finished rows are fed padding."""
    ids, mask = _left_pad(suffixes, pad_id, device)
    attention = mask.long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1].float()
    state = _RowState(len(suffixes), max_new_tokens, eos, tokenizer, stop)
    next_pos = positions[:, -1] + 1
    temps, tops, keys = _row_sampling(len(suffixes), temperature, top_p, keys, device)
    for step in range(max_new_tokens):
        tokens = _pick_tokens(logits, temps, tops, keys, torch.full_like(keys, step), sample=temperature > 0)
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
# The static-shape decoder: a DecodeSession is a fixed batch of row slots over a preallocated KV cache of fixed
# length. Every decode step runs on the same shapes whatever the rows are doing:
#   - each row keeps its own write slot and position on the device; the step writes its keys/values with index_copy_
#     at those slots, so no Python slicing by host integers happens inside the step;
#   - the attention mask and the cache write index are built once per step and shared by all layers;
#   - a finished or empty slot is masked (its outputs are ignored), never compacted out of the batch;
#   - sampling, EOS and length checks and the token history stay on the device.
# So on CUDA the whole step is captured once in a CUDA graph and replayed per token; the host reads the token
# history and done flags only every `sync_every` steps, when it also checks stop strings. Prefill stays eager.
# Rows can join a free slot at any step (prefilled into it) and leave the moment they finish: the embedded server
# (serve.py) decodes all its requests in one session, and generate(static=True) refills finished slots with the
# next prompts. On CPU the same step runs eagerly; tests compare it with Hugging Face there.

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKET = 256  # cache lengths are rounded up to a multiple of this, so few shapes (and graphs) exist


def batch_bucket(n, cap=None):
    """The smallest batch bucket holding n rows (a multiple of the largest bucket beyond it), at most cap."""
    b = next((b for b in BATCH_BUCKETS if b >= n), -(-n // BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1])
    return min(b, cap) if cap else b


def length_bucket(n, cap=None):
    b = -(-n // LENGTH_BUCKET) * LENGTH_BUCKET
    return min(b, cap) if cap else b


class _Row:
    """Host-side bookkeeping of one occupied slot."""

    def __init__(self, tag, state, n_prompt, temperature):
        self.tag, self.state, self.n_prompt, self.temperature, self.read = tag, state, n_prompt, temperature, 0


class DecodeSession:
    """Decoding rows in fixed slots of a static KV cache (Llama-family models only; see _uses_fast_path).

        session = DecodeSession(model, tokenizer, batch=8, length=512)
        session.add([(prompt_ids, dict(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1, stop=None), tag)])
        while session.busy():
            session.run()                        # sync_every steps, then finished rows leave
            for tag, token_ids, finish_reason, n_prompt in session.collect(): ...

    graphs=None captures the step in a CUDA graph on CUDA and runs it eagerly elsewhere; graphs=False never captures.
    Every method runs under torch.inference_mode, whichever thread calls it.
    prefix_cache/n_prefix: keys/values of a token prefix that every row starts with (computed once).
    """

    def __init__(self, model, tokenizer, batch, length, prefix_cache=None, n_prefix=0, sync_every=8, graphs=None,
                 prefill_tokens=2048):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.eos_list = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_list[0]
        self.eos = torch.tensor(self.eos_list or [-1], device=self.device)
        self.prefix_cache, self.n_prefix = prefix_cache, n_prefix
        self.sync_every, self.prefill_tokens = sync_every, prefill_tokens
        # graphs capture plain kernels; under autocast (whose weight cache a graph must not hold) run eagerly
        self.use_graphs = (self.device.type == "cuda" and graphs is not False
                           and not torch.is_autocast_enabled(self.device.type))
        self.batch, self.length, self.rows = 0, 0, []
        self.resize(batch, length)

    # -- shapes -------------------------------------------------------------

    @torch.inference_mode()
    def resize(self, batch, length):
        """Grow (or first allocate) the slots and the cache; rows in flight keep their slots and state."""
        old = None if not self.batch else self._state()
        old_b, old_l, d = self.batch, self.length, self.device
        config = self.model.config
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache = _new_llama_cache(self.model, batch, length, d)
        for k, v in cache:  # zeros, not empty: masked slots get weight 0, and 0 * NaN would still be NaN
            k.zero_()
            v.zero_()
        if old is not None:
            for (k, v), (ok, ov) in zip(cache, self.cache):
                k[:old_b, :, :old_l] = ok
                v[:old_b, :, :old_l] = ov
        self.cache = cache
        self.batch, self.length = batch, length
        long = dict(dtype=torch.long, device=d)
        self.key_mask = torch.zeros((batch, length), dtype=torch.bool, device=d)
        self.key_slots = torch.arange(length, device=d)
        # flat row index of (row b, kv head h, slot 0) in a cache tensor viewed as (batch * n_kv * length, head_dim)
        self.cache_base = ((torch.arange(batch, device=d)[:, None] * self.n_kv + torch.arange(self.n_kv, device=d))
                           * length).reshape(-1)
        self.history_base = torch.arange(batch, device=d) * length
        self.history = torch.zeros((batch, length), **long)
        self.tokens, self.pos, self.slot = (torch.zeros(batch, **long) for _ in range(3))
        self.n_gen, self.max_new, self.keys = (torch.zeros(batch, **long) for _ in range(3))
        self.done = torch.ones(batch, dtype=torch.bool, device=d)  # an empty slot is a finished row
        self.temperature = torch.zeros(batch, dtype=torch.float32, device=d)
        self.top_p = torch.ones(batch, dtype=torch.float32, device=d)
        if old is not None:
            self.key_mask[:old_b, :old_l] = old.pop("key_mask")
            self.history[:old_b, :old_l] = old.pop("history")
            for name, value in old.items():
                getattr(self, name)[:old_b] = value
        self.rows += [None] * (batch - len(self.rows))
        self.graphs, self.pool = {}, None  # graphs hold the old tensors' addresses: capture again

    def _state(self):
        names = ("tokens", "pos", "slot", "n_gen", "max_new", "keys", "done", "temperature", "top_p", "key_mask",
                 "history")
        return {name: getattr(self, name).clone() for name in names}

    def free_slots(self):
        return [s for s, row in enumerate(self.rows) if row is None]

    def busy(self):
        return any(row is not None for row in self.rows)

    def room(self, n_prompt):
        """How many tokens a row with this prompt could generate in this cache (< 1: the prompt does not fit)."""
        return self.length - self.n_prefix - n_prompt

    # -- rows joining: eager prefill into free slots --------------------------

    @torch.inference_mode()
    def add(self, items):
        """Prefill rows into free slots. items: (prompt_ids, params, tag), params a dict of max_new_tokens,
        temperature, top_p, seed, stop. Rows are prefilled in groups of similar length. Returns their slots."""
        free = self.free_slots()
        if len(items) > len(free):
            raise ValueError(f"{len(items)} rows do not fit the {len(free)} free slots")
        items = sorted(items, key=lambda item: len(item[0]))
        slots = free[:len(items)]
        start = 0
        while start < len(items):
            width = len(items[start][0])
            end = start + 1
            while end < len(items) and len(items[end][0]) * (end - start + 1) <= max(self.prefill_tokens, width):
                end += 1
            self._prefill(items[start:end], slots[start:end])
            start = end
        return slots

    def _prefill(self, items, slots):
        d, n_prefix = self.device, self.n_prefix
        suffixes = [ids for ids, _, _ in items]
        ids, mask = _left_pad(suffixes, self.pad_id, d)
        width = ids.shape[1]
        rows = torch.tensor(slots, device=d)
        room = self.length - n_prefix - width
        if room < 1:
            raise ValueError(f"a prompt of {n_prefix + width} tokens leaves no room for a reply in a cache of "
                             f"{self.length} tokens")
        max_new = []
        for (prompt, params, tag), s in zip(items, slots):
            max_new.append(max(1, min(int(params.get("max_new_tokens", 256)), room)))
            self.rows[s] = _Row(tag, _RowState(1, max_new[-1], self.eos_list, self.tokenizer, params.get("stop")),
                                n_prefix + len(prompt), float(params.get("temperature", 0.0)))
        try:
            self.key_mask[rows] = False
            if self.prefix_cache is not None:
                for (k, v), (pk, pv) in zip(self.cache, self.prefix_cache):
                    k[rows, :, :n_prefix] = pk
                    v[rows, :, :n_prefix] = pv
                self.key_mask[rows, :n_prefix] = True
            self.key_mask[rows, n_prefix:n_prefix + width] = mask
            positions = (n_prefix + mask.long().cumsum(-1) - 1).clamp(min=0)
            hidden = _llama_forward(self.model, ids, positions, self.cache, rows, n_prefix,
                                    self.key_mask[rows, :n_prefix + width])
            logits = self.model.get_output_embeddings()(hidden).float()
            temps = torch.tensor([float(p.get("temperature", 0.0)) for _, p, _ in items], device=d)
            tops = torch.tensor([float(p.get("top_p", 1.0)) for _, p, _ in items], device=d)
            keys = torch.tensor([seed_key(p.get("seed") or 0) for _, p, _ in items], dtype=torch.long, device=d)
            first = _pick_tokens(logits, temps, tops, keys, torch.zeros_like(keys), sample=bool((temps > 0).any()))
            max_new = torch.tensor(max_new, device=d)
            self.temperature[rows], self.top_p[rows], self.keys[rows], self.max_new[rows] = temps, tops, keys, max_new
            self.tokens[rows] = first
            self.history[rows, 0] = first
            self.n_gen[rows] = 1
            self.pos[rows] = positions[:, -1] + 1
            self.slot[rows] = n_prefix + width
            self.done[rows] = torch.isin(first, self.eos) | (max_new <= 1)
        except BaseException:
            self.release(slots)
            raise

    @torch.inference_mode()
    def release(self, slots):
        """Free slots at once (a finished row, or a row whose request failed)."""
        for s in slots:
            self.rows[s] = None
        if slots:
            self.done[torch.tensor(slots, device=self.device)] = True

    # -- the step: fixed shapes, no host sync ---------------------------------

    def _step(self, sample):
        """One token for every slot; reads and writes only this session's tensors, so it can be graph-captured."""
        body = self.model.model
        batch, n_kv, head_dim = self.batch, self.n_kv, self.head_dim
        hidden = body.embed_tokens(self.tokens[:, None])
        cos, sin = body.rotary_emb(hidden, self.pos[:, None])
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # built once per step: which slots each row may attend to (its own keys plus the one written now), and where
        # in the flattened cache the new keys/values go
        mask = (self.key_mask | (self.key_slots[None, :] == self.slot[:, None]))[:, None, None, :]
        index = self.cache_base + self.slot[:, None].expand(batch, n_kv).reshape(-1)
        for i, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, 1, -1, head_dim)
            k = attn.k_proj(x).view(batch, 1, -1, head_dim)
            v = attn.v_proj(x).view(batch * n_kv, head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache, v_cache = self.cache[i]
            k_cache.view(-1, head_dim).index_copy_(0, index, k.reshape(batch * n_kv, head_dim))
            v_cache.view(-1, head_dim).index_copy_(0, index, v)
            # grouped-query attention: the query heads sharing a key/value head ride on the query-length axis
            q = q.reshape(batch, n_kv, -1, head_dim)
            out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.o_proj(out.reshape(batch, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.model.get_output_embeddings()(body.norm(hidden[:, -1])).float()
        nxt = _pick_tokens(logits, self.temperature, self.top_p, self.keys, self.n_gen, sample)
        # bookkeeping, on the device: a finished slot stays where it is and changes nothing the host will read
        live = (~self.done).long()
        self.key_mask.scatter_(1, self.slot[:, None], True)
        self.history.view(-1).index_copy_(0, self.history_base + self.n_gen.clamp(max=self.length - 1), nxt)
        self.n_gen += live
        self.done |= torch.isin(nxt, self.eos) | (self.n_gen >= self.max_new)
        self.tokens.copy_(nxt)
        self.pos += live
        self.slot.copy_((self.slot + live).clamp(max=self.length - 1))

    @torch.inference_mode()
    def step(self, sample=None):
        """One decode step for all slots: a CUDA graph replay on CUDA, the same code eagerly elsewhere."""
        sample = self.sampling() if sample is None else sample
        if not self.use_graphs:
            return self._step(sample)
        graph = self.graphs.get(sample)
        if graph is None:
            try:
                graph = self.graphs[sample] = self._capture(sample)
            except Exception as e:  # an op this torch/transformers cannot capture: slower, but still correct
                print(f"warning: CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); decoding without "
                      f"graphs", file=sys.stderr)
                self.use_graphs = False
                return self._step(sample)
        graph.replay()

    def sampling(self):
        """Whether any row samples (else the step skips the sort over the vocabulary)."""
        return any(row is not None and row.temperature > 0 for row in self.rows)

    def _capture(self, sample):
        # Warm up on a side stream (lazy initialisation, allocator), then capture. Warm-up steps really run, so the
        # small state they advance is put back; the cache slots they wrote are rewritten by the next real step
        # before anything reads them (those slots are still masked).
        saved = self._state()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(sample)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._restore(saved)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (HTTP handlers, a training loop) may use CUDA while this one captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._step(sample)
        finally:
            self._restore(saved)
        return graph

    def _restore(self, saved):
        for name, value in saved.items():
            getattr(self, name).copy_(value)

    @torch.inference_mode()
    def run(self, steps=None):
        """Decode `steps` (default sync_every) steps without reading anything back."""
        sample = self.sampling()
        for _ in range(steps or self.sync_every):
            self.step(sample)

    # -- the host's look, every few steps --------------------------------------

    @torch.inference_mode()
    def collect(self):
        """Read the new tokens (one sync), apply EOS, stop strings and length on the host, free finished slots.
        Returns [(tag, token_ids, finish_reason, prompt_tokens)] for the rows that finished."""
        occupied = [s for s, row in enumerate(self.rows) if row is not None]
        if not occupied:
            return []
        n_gen = self.n_gen.tolist()
        lo = min(self.rows[s].read for s in occupied)
        hi = max(n_gen[s] for s in occupied)
        history = self.history[:, lo:hi].tolist() if hi > lo else [[]] * self.batch
        finished, freed = [], []
        for s in occupied:
            row = self.rows[s]
            state = row.state
            for token in history[s][row.read - lo:n_gen[s] - lo]:
                state.push(0, token)
                if state.finish[0] is not None:
                    break
            row.read = n_gen[s]
            if state.finish[0] is not None:
                [(token_ids, reason)] = state.results()
                finished.append((row.tag, token_ids, reason, row.n_prompt))
                freed.append(s)
        self.release(freed)
        return finished


def _generate_static(model, tokenizer, id_lists, seeds, n_prefix, prefix_cache, max_new_tokens, batch_size,
                     temperature, top_p, stop, prefill_tokens, sync_every=8):
    """All prompts through one DecodeSession: prompts shortest first, and a slot freed by a finished row is refilled
    with the next prompt. Returns (token_ids, finish_reason) per prompt."""
    order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
    batch = min(batch_bucket(len(order)), batch_size)
    width = max(len(ids) for ids in id_lists) - n_prefix
    session = DecodeSession(model, tokenizer, batch, length_bucket(n_prefix + width + max_new_tokens), prefix_cache,
                            n_prefix, sync_every=sync_every, prefill_tokens=prefill_tokens)
    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop)
    pending, outputs = deque(order), [None] * len(id_lists)
    while pending or session.busy():
        free = session.free_slots()
        # refill once a quarter of the slots are free, so one prefill serves several rows
        if pending and free and (4 * len(free) >= batch or len(free) >= len(pending) or not session.busy()):
            take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
            session.add([(id_lists[i][n_prefix:], dict(params, seed=seeds[i]), i) for i in take])
        session.run()
        for i, token_ids, reason, _ in session.collect():
            outputs[i] = (token_ids, reason)
    return outputs


# -----------------------------------------------------------------------------
# A tiny CLI, for trying a model by hand

def main(argv=None):
    p = argparse.ArgumentParser(prog="generate.py", description="Greedy (or sampled) completion of one prompt.")
    p.add_argument("--model", required=True, help="Hugging Face id or local folder")
    p.add_argument("--prompt", required=True, help="user message; the model's chat template is applied if it has one")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        model, tokenizer = load_model(args.model, resolve_device(args.device))
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = args.prompt
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    print(generate(model, tokenizer, [text], max_new_tokens=args.max_new_tokens, temperature=args.temperature)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
