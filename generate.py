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
