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
from generate import _common_prefix, _uses_fast_path, generate
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


def test_fast_path_matches_hf_greedy_on_mixed_lengths(tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir)
    assert _uses_fast_path(model)
    prompts = make_prompts(tokenizer)
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 4  # really mixed lengths
    expected = hf_greedy(model, tokenizer, prompts, 24)
    for batch_size in (8, 3, 1):
        assert generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=batch_size) == expected


def test_generic_path_matches_hf_greedy(tiny_gpt2_dir):
    model, tokenizer = load_pretrained(tiny_gpt2_dir)
    assert not _uses_fast_path(model)
    prompts = make_prompts(tokenizer)
    assert generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=4) == hf_greedy(model, tokenizer, prompts, 20)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rows_ending_at_different_times(kind, tiny_llama_dir, tiny_gpt2_dir):
    """Make a frequent token the EOS so rows finish at different steps (this drives batch compaction), and add a
    stop string; every row must still match the reference."""
    model, tokenizer = load_pretrained(tiny_llama_dir if kind == "llama" else tiny_gpt2_dir)
    prompts = make_prompts(tokenizer)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = model.generate(**enc, max_new_tokens=30, do_sample=False)[:, enc["input_ids"].shape[1]:].tolist()
    rows_with = Counter(t for row in rows for t in set(row))  # the token that appears in the most rows
    model.generation_config.eos_token_id = rows_with.most_common(1)[0][0]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id)
    expected = hf_greedy(model, tokenizer, prompts, 30)
    ours = generate(model, tokenizer, prompts, max_new_tokens=30, batch_size=8, details=True)
    assert [r["text"] for r in ours] == expected
    reasons = Counter(r["finish_reason"] for r in ours)
    assert reasons["stop"] >= 2, reasons  # several rows did end early, so compaction ran
    stop = [max(expected, key=len)[3:5]]
    assert generate(model, tokenizer, prompts, max_new_tokens=30, stop=stop) == \
        hf_greedy(model, tokenizer, prompts, 30, stop=stop)


def test_stop_strings_cut_text_and_report_stop(tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir)
    prompts = make_prompts(tokenizer)
    free = generate(model, tokenizer, prompts, max_new_tokens=24, details=True)
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 24 for r in free)
    stop = free[0]["text"][6:8]
    cut = generate(model, tokenizer, prompts, max_new_tokens=24, stop=[stop], details=True)
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
