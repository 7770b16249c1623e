"""Our decoder against Hugging Face greedy generation, the independent reference.

    python -m pytest -q tests/test_generate.py            # tiny random models, seconds
    python -m pytest -q -m slow tests/test_generate.py    # + SmolLM2-135M-Instruct on 16 GSM8K questions

Both decoder paths are covered: the Llama fast path (static cache, shared-prefix reuse, grouped prefill, batch
compaction) and the generic path through the model's own cache (GPT-2).
"""
import json
from collections import Counter

import pytest
import torch

from conftest import load_pretrained
from generate import DecodeSession, _common_prefix, _pick_tokens, _uses_fast_path, generate, seed_key
from train import render_prompt

QUESTIONS = ["How many clips?", "Natalia sold clips to 48 of her friends in April, and then she sold half as many.",
             "0", "The answer is", "How many clips did Natalia sell altogether in April and May? Think step by step.",
             "$1,200 + 3 = ?", "positive or negative", "Question: 7 * 8"]


def hf_greedy(model, tokenizer, prompts, max_new_tokens, stop=None):
    """Reference: one left-padded HF generate call over all prompts, cut at EOS and then at the first stop string."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    texts = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ids = row[:next((i for i, t in enumerate(row) if t in eos), len(row))]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop or [] if s in text), default=-1)
        texts.append(text[:cut] if cut >= 0 else text)
    return texts


def make_prompts(tokenizer):
    return [render_prompt(tokenizer, q) for q in QUESTIONS]


@pytest.mark.parametrize("static", [False, True])
def test_fast_path_matches_hf_greedy_on_mixed_lengths(static, tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir)
    assert _uses_fast_path(model)
    prompts = make_prompts(tokenizer)
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 4  # really mixed lengths
    expected = hf_greedy(model, tokenizer, prompts, 24)
    for batch_size in (8, 3, 1):
        assert generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=batch_size, static=static) == expected


def test_generic_path_matches_hf_greedy(tiny_gpt2_dir):
    model, tokenizer = load_pretrained(tiny_gpt2_dir)
    assert not _uses_fast_path(model)
    prompts = make_prompts(tokenizer)
    assert generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=4) == hf_greedy(model, tokenizer, prompts, 20)


@pytest.mark.parametrize("kind", ["llama", "llama-static", "gpt2"])
def test_rows_ending_at_different_times(kind, tiny_llama_dir, tiny_gpt2_dir):
    """Make a frequent token the EOS so rows finish at different steps (this drives batch compaction, or in the
    static path masking and refilling freed slots), and add a stop string; every row must still match the
    reference."""
    model, tokenizer = load_pretrained(tiny_gpt2_dir if kind == "gpt2" else tiny_llama_dir)
    static = kind == "llama-static"
    prompts = make_prompts(tokenizer)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = model.generate(**enc, max_new_tokens=30, do_sample=False)[:, enc["input_ids"].shape[1]:].tolist()
    rows_with = Counter(t for row in rows for t in set(row))  # the token that appears in the most rows
    model.generation_config.eos_token_id = rows_with.most_common(1)[0][0]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id)
    expected = hf_greedy(model, tokenizer, prompts, 30)
    ours = generate(model, tokenizer, prompts, max_new_tokens=30, batch_size=8, details=True, static=static)
    assert [r["text"] for r in ours] == expected
    assert generate(model, tokenizer, prompts, max_new_tokens=30, batch_size=4, static=static) == expected
    reasons = Counter(r["finish_reason"] for r in ours)
    assert reasons["stop"] >= 2, reasons  # several rows did end early, so compaction ran
    stop = [max(expected, key=len)[3:5]]
    assert generate(model, tokenizer, prompts, max_new_tokens=30, stop=stop, static=static) == \
        hf_greedy(model, tokenizer, prompts, 30, stop=stop)


@pytest.mark.parametrize("static", [False, True])
def test_stop_strings_cut_text_and_report_stop(static, tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir)
    prompts = make_prompts(tokenizer)
    free = generate(model, tokenizer, prompts, max_new_tokens=24, details=True, static=static)
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 24 for r in free)
    stop = free[0]["text"][6:8]
    cut = generate(model, tokenizer, prompts, max_new_tokens=24, stop=[stop], details=True, static=static)
    assert cut[0]["text"] == free[0]["text"][:free[0]["text"].find(stop)]
    assert cut[0]["finish_reason"] == "stop" and cut[0]["completion_tokens"] < 24
    for full, short in zip(free, cut):
        assert stop not in short["text"] and full["text"].startswith(short["text"])


def test_sampling_is_reproducible_per_row_regardless_of_batching(tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir)
    prompts = make_prompts(tokenizer)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9)
    a = generate(model, tokenizer, prompts, batch_size=8, seed=list(range(8)), **kw)
    b = generate(model, tokenizer, prompts, batch_size=2, seed=list(range(8)), **kw)
    c = generate(model, tokenizer, prompts, batch_size=8, seed=list(range(100, 108)), **kw)
    assert a == b
    assert a != c
    assert a != generate(model, tokenizer, prompts, max_new_tokens=16)


def test_a_seeded_row_samples_the_same_text_whatever_shares_its_batch(tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir)
    prompts = make_prompts(tokenizer)
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95)
    alone = generate(model, tokenizer, [prompts[4]], seed=[77], **kw)[0]
    crowd = generate(model, tokenizer, prompts[:4] + prompts[5:] + [prompts[4]], seed=[1, 2, 3, 4, 5, 6, 7, 77], **kw)
    assert crowd[-1] == alone
    # the same prompt with other seeds in the same batch samples other texts: rows do not share a stream
    assert len(set(generate(model, tokenizer, [prompts[4]] * 6, seed=list(range(6)), **kw))) > 1


def test_device_sampler_draws_from_the_top_p_distribution():
    """Empirical frequencies over many row keys against the renormalised nucleus, computed by hand."""
    logits = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    keys = torch.tensor([seed_key(s) for s in range(n)])
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (1.3, 0.5)]:
        probs = torch.softmax(logits / temperature, dim=-1)  # already sorted: descending logits
        before = probs.cumsum(0) - probs
        nucleus = torch.where(before < top_p, probs, torch.zeros_like(probs)) if top_p < 1 else probs
        expected = nucleus / nucleus.sum()
        tokens = _pick_tokens(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_p), keys,
                              torch.full((n,), 5))
        freq = torch.bincount(tokens, minlength=len(logits)).float() / n
        assert torch.allclose(freq, expected, atol=0.01), (temperature, top_p, freq, expected)
        assert (freq[expected == 0] == 0).all()
    # a row's draws change with its counter and with its key, and rows at temperature 0 stay greedy
    one = lambda key, step, t=1.0: _pick_tokens(logits[None], torch.tensor([t]), torch.tensor([1.0]),
                                                torch.tensor([seed_key(key)]), torch.tensor([step]))[0].item()
    assert len({one(3, step) for step in range(40)}) > 2 and len({one(key, 0) for key in range(40)}) > 2
    assert {one(key, 0, t=0.0) for key in range(10)} == {0}


def test_top_p_near_zero_is_greedy(tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir)
    prompts = make_prompts(tokenizer)
    assert generate(model, tokenizer, prompts, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3) == \
        generate(model, tokenizer, prompts, max_new_tokens=12)


def test_uninitialised_memory_never_leaks_into_outputs(tiny_llama_dir, monkeypatch):
    """Reused memory can hold NaN. Cache slots that are never written (left of a short prefill group) must not
    reach the output, even through a zero attention weight (0 * NaN = NaN)."""
    model, tokenizer = load_pretrained(tiny_llama_dir)
    prompts = make_prompts(tokenizer)
    expected = hf_greedy(model, tokenizer, prompts, 12)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    # a tiny prefill budget puts every row in its own group, so most rows have unwritten slots
    assert generate(model, tokenizer, prompts, max_new_tokens=12, prefill_tokens=1) == expected
    assert len(generate(model, tokenizer, prompts, max_new_tokens=12, temperature=0.8, seed=1,
                        prefill_tokens=1)) == len(prompts)


def test_static_path_samples_what_the_compacting_path_samples(tiny_llama_dir):
    """Same per-row keys and counters: the two decoders draw the same tokens, however the static one schedules."""
    model, tokenizer = load_pretrained(tiny_llama_dir)
    prompts = make_prompts(tokenizer)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=list(range(8)))
    compacting = generate(model, tokenizer, prompts, **kw)
    assert generate(model, tokenizer, prompts, static=True, batch_size=3, **kw) == compacting
    assert generate(model, tokenizer, prompts, static=True, batch_size=8, **kw) == compacting


def test_session_rows_join_and_leave_mid_decode(tiny_llama_dir):
    """The step-level API the server uses: rows join a running session at different steps, with their own settings,
    the session grows under them, and each row still decodes exactly what HF does for it alone."""
    model, tokenizer = load_pretrained(tiny_llama_dir)
    prompts = make_prompts(tokenizer)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lengths = [20, 5, 12, 9]
    expected = [hf_greedy(model, tokenizer, [prompts[i]], n)[0] for i, n in enumerate(lengths)]
    sampled_alone = generate(model, tokenizer, [prompts[5]], max_new_tokens=10, temperature=0.8, seed=[5])
    session = DecodeSession(model, tokenizer, batch=2, length=256, sync_every=3)
    greedy = lambda i: (ids[i], dict(max_new_tokens=lengths[i]), i)
    session.add([greedy(0)])
    session.run(2)
    session.add([greedy(1)])  # joins while row 0 decodes
    done, joined = {}, False
    while session.busy() or not joined:
        session.run()
        for tag, token_ids, reason, n_prompt in session.collect():
            assert n_prompt == len(ids[tag])
            done[tag] = tokenizer.decode(token_ids, skip_special_tokens=True)
        if not joined and 1 in done:  # row 1 finished first and freed its slot; grow and add more
            assert 0 not in done
            session.resize(4, 512)
            session.add([greedy(2), greedy(3), (ids[5], dict(max_new_tokens=10, temperature=0.8, seed=5), 5)])
            joined = True
    assert [done[i] for i in range(4)] == expected
    assert done[5] == sampled_alone[0]
    assert session.free_slots() == [0, 1, 2, 3]


def test_common_prefix_leaves_every_row_a_token():
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3]]) == [1, 2]
    assert _common_prefix([[1, 2], [3, 4]]) == []
    assert _common_prefix([[7, 8, 9], [7, 8, 9]]) == [7, 8]


@pytest.mark.slow
def test_smollm2_matches_hf_greedy_on_gsm8k(smollm2_dir, gsm8k_test_file):
    model, tokenizer = load_pretrained(smollm2_dir)
    questions = [json.loads(line)["question"] for line in open(gsm8k_test_file)][:16]
    prompts = [render_prompt(tokenizer, q) for q in questions]
    expected = hf_greedy(model, tokenizer, prompts, 48)
    assert generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=16) == expected
