"""Tests for train.py on a tiny random Llama and a byte-level tokenizer built in memory (CPU, no network).

    python -m pytest -q tests/test_train.py

References are independent of train.py: the masked loss is checked against Hugging Face's own `labels=` loss (mean
cross-entropy with -100 on prompt and pad positions) and against a row-by-row computation without padding; the
prompt mask against a hand-worked example; resume against an uninterrupted run of the same seed.
"""

import math
import random
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lora  # noqa: E402
import train as train_module  # noqa: E402
from train import (TrainingError, activation_bytes_per_token, auto_micro_batch_tokens, bucket,
                   chunked_cross_entropy_sum, collate, encode_pair, lr_at, plan_steps, render_prompt,  # noqa: E402
                   response_loss_sum, split_micro_batches, train)

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PAIRS = [("What is 2+3?", "5"), ("Capital of France?", "Paris"), ("Colour of the sky?", "blue"),
         ("Opposite of hot?", "cold")]


# -----------------------------------------------------------------------------
# Fixtures: a byte-level tokenizer (every byte is one token, so any text encodes) and a tiny Llama

def make_tokenizer(chat_template=True):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         initializer_range=0.3)  # HF's 0.02 gives a near-uniform, nearly inert random model that
    # rank-8 adapters cannot teach 4 answers in 30 steps; larger weights make the tiny model expressive enough.
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def student(model_dir, dropout=0.0, seed=0):
    """A fresh tiny model with a fresh adapter; the seed fixes A's random init so two students start identical."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    return lora.add_lora(model, r=8, alpha=16, dropout=dropout, verbose=False)


def lora_state(model):
    return {f"{n}.{p}": getattr(m, p).weight.detach().clone() for n, m in lora.lora_modules(model)
            for p in ("lora_A", "lora_B")}



def hf_reference_batch(tokenizer, pairs):
    """A right-padded batch with an attention mask and HF-style labels: -100 on prompt and pad positions."""
    encoded = [encode_pair(tokenizer, p, r, 1024) for p, r in pairs]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, attention, labels


# -----------------------------------------------------------------------------
# Rendering and encoding

def test_render_prompt_chat_and_plain_templates():
    assert render_prompt(make_tokenizer(), "hi") == "<|user|>hi\n<|assistant|>"
    assert render_prompt(make_tokenizer(), "hi", system="be brief") == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    plain = make_tokenizer(chat_template=False)
    assert render_prompt(plain, "What is 2+3?") == "<s>### Question:\nWhat is 2+3?\n\n### Answer:\n"


def test_encode_pair_prompt_ids_match_evaluation_and_end_with_eos(tokenizer):
    ids, n_prompt = encode_pair(tokenizer, "What is 2+3?", "2+3=5\n#### 5", max_seq_len=1024)
    rendered = render_prompt(tokenizer, "What is 2+3?")
    assert ids[:n_prompt] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[n_prompt:-1]) == "2+3=5\n#### 5"
    assert ids[-1] == tokenizer.eos_token_id
    truncated, n = encode_pair(tokenizer, "What is 2+3?", "2+3=5\n#### 5", max_seq_len=n_prompt + 3)
    assert (len(truncated), n) == (n_prompt + 3, n_prompt) and truncated == ids[:n_prompt + 3]


# -----------------------------------------------------------------------------
# Prompt masking and loss normalisation

def test_collate_target_mask_by_hand():
    input_ids, mask = collate([([11, 12, 13, 14, 15], 2), ([21, 22, 23], 1), ([31, 32], 1)], pad_id=0,
                              device=torch.device("cpu"))
    assert input_ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 0, 0], [31, 32, 0, 0, 0]]
    # position t predicts token t+1; row 0's response is 13, 14, 15 -> predicted from positions 1, 2, 3
    assert mask.tolist() == [[False, True, True, True],
                             [True, True, False, False],
                             [True, False, False, False]]
    # the masked next tokens are exactly the response tokens, and no pad
    assert input_ids[:, 1:][mask].tolist() == [13, 14, 15, 22, 23, 32]


def test_response_loss_sum_matches_hf_labels_and_rowwise_reference(model_dir, tokenizer):
    model = student(model_dir).eval()
    with torch.no_grad():
        for m in (m for _, m in lora.lora_modules(model)):  # a non-trivial adapter, like a model mid-training
            m.lora_B.weight.normal_(0, 0.05)
        encoded = [encode_pair(tokenizer, p, r, 1024) for p, r in PAIRS]
        input_ids, mask = collate(encoded, tokenizer.pad_token_id, torch.device("cpu"))
        ours = response_loss_sum(model, input_ids, mask)
        n_targets = sum(len(ids) - n for ids, n in encoded)

        ref_ids, attention, labels = hf_reference_batch(tokenizer, PAIRS)
        hf_mean = model(input_ids=ref_ids, attention_mask=attention, labels=labels).loss  # mean over labelled tokens
        torch.testing.assert_close(ours / n_targets, hf_mean, atol=1e-5, rtol=1e-5)

        rowwise = 0.0
        for ids, n_prompt in encoded:  # no padding at all
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            rowwise += torch.nn.functional.cross_entropy(logits[n_prompt - 1:], torch.tensor(ids[n_prompt:]),
                                                         reduction="sum")
        torch.testing.assert_close(ours, rowwise, atol=1e-4, rtol=1e-5)

        # the pad id and the prompt-position targets never enter the loss
        other_pad, _ = collate(encoded, 7, torch.device("cpu"))
        assert torch.equal(response_loss_sum(model, other_pad, mask), ours)
        assert mask.sum() == n_targets


def test_step_loss_and_gradient_are_normalised_over_the_whole_step(model_dir, tokenizer, monkeypatch):
    # One step over all four rows, cut into one micro-batch per row or a single micro-batch: the logged loss and
    # the gradient must both equal a single-batch mean cross-entropy over all response tokens (HF labels).
    model = student(model_dir)
    with torch.no_grad():
        for m in (m for _, m in lora.lora_modules(model)):
            m.lora_B.weight.normal_(0, 0.05)
    start = lora_state(model)

    ref_ids, attention, labels = hf_reference_batch(tokenizer, PAIRS)
    model.zero_grad()
    reference = model(input_ids=ref_ids, attention_mask=attention, labels=labels).loss
    reference.backward()
    ref_grads = [p.grad.clone() for _, m in lora.lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]
    model.zero_grad()

    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        seen.append([p.grad.clone() for p in params])
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    for budget in (1, 10_000):  # 1 token -> every row is its own micro-batch
        with torch.no_grad():
            for name, m in lora.lora_modules(model):
                m.lora_A.weight.copy_(start[f"{name}.lora_A"])
                m.lora_B.weight.copy_(start[f"{name}.lora_B"])
        stats = train(model, tokenizer, PAIRS, epochs=1, batch_size=4, micro_batch_tokens=budget, lr=1e-3,
                      progress=False)
        assert stats["steps"] == 1
        assert stats["loss_history"][0] == pytest.approx(reference.item(), rel=1e-5)
        for got, want in zip(seen[-1], ref_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_chunked_cross_entropy_equals_the_full_logits_loss_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000).requires_grad_(False)
    targets = torch.randint(0, 1000, (37,))
    ref_hidden = (torch.randn(37, 32) * 3).requires_grad_()
    reference = torch.nn.functional.cross_entropy(head(ref_hidden).float(), targets, reduction="sum")
    (reference * 0.37).backward()
    for chunk_rows in (1, 5, 36, 37, 1000):  # many chunks, a ragged last chunk, one chunk
        hidden = ref_hidden.detach().clone().requires_grad_()
        loss = chunked_cross_entropy_sum(hidden, head, targets, chunk_bytes=chunk_rows * 4 * 1000)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
        (loss * 0.37).backward()
        torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the value alone, no gradient work
        assert chunked_cross_entropy_sum(ref_hidden, head, targets, 800).item() == pytest.approx(reference.item(),
                                                                                                 rel=1e-6)


def test_model_loss_in_small_chunks_matches_full_logits_and_never_saves_logits(model_dir, tokenizer, monkeypatch):
    # the whole path (gather, chunked lm_head, backward into the adapters) against the straightforward full-logits
    # cross-entropy; with a chunk of 3 rows and autograd watched: no logits are kept for backward
    model = student(model_dir)
    with torch.no_grad():
        for m in (m for _, m in lora.lora_modules(model)):
            m.lora_B.weight.normal_(0, 0.05)
    encoded = [encode_pair(tokenizer, p, r, 1024) for p, r in PAIRS]
    input_ids, mask = collate(encoded, tokenizer.pad_token_id, torch.device("cpu"))
    vocab = model.get_output_embeddings().weight.shape[0]
    params = [p for _, m in lora.lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]

    monkeypatch.setattr(train_module, "LOSS_CHUNK_BYTES", 3 * 4 * vocab)
    # fp32, as training on CPU runs: the loss to ~1e-6; fp64: the gradients exactly up to float64 rounding
    for dtype, grad_tol in ((torch.float32, None), (torch.float64, 1e-10)):
        model.to(dtype)
        full = torch.nn.functional.cross_entropy(model(input_ids=input_ids).logits[:, :-1][mask],
                                                 input_ids[:, 1:][mask], reduction="sum")
        want = torch.autograd.grad(full, params)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            ours = response_loss_sum(model, input_ids, mask)
        got = torch.autograd.grad(ours, params)
        assert ours.item() == pytest.approx(full.item(), rel=1e-6)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=grad_tol or 1e-4, atol=grad_tol or 1e-5)
        assert saved and not [shape for shape in saved if shape[-1] == vocab]  # no logits kept for backward


# -----------------------------------------------------------------------------
# Batching

def test_split_micro_batches_respects_budget_and_loses_nothing():
    rng = random.Random(0)
    for trial in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        step = rng.sample(range(len(lengths)), rng.randint(1, len(lengths)))
        budget = rng.randint(max(lengths[i] for i in step), 2000)  # train() never passes a budget below the longest
        micro = split_micro_batches(step, lengths, budget)
        assert sorted(i for mb in micro for i in mb) == sorted(step)
        assert all(len(mb) * max(lengths[i] for i in mb) <= budget for mb in micro)
        # greedy packing: two neighbouring micro-batches could not have been one
        for a, b in zip(micro, micro[1:]):
            assert (len(a) + 1) * max(lengths[i] for i in a + b[:1]) > budget
    assert split_micro_batches([0, 1, 2], [5, 6, 7], 10) == [[0], [1], [2]]
    assert split_micro_batches([2, 0, 1], [3, 3, 4], 12) == [[0, 1, 2]]


def test_plan_steps_is_deterministic_and_covers_each_row_once_per_epoch():
    rng = random.Random(1)
    for n, batch_size, epochs in [(1, 4, 3), (10, 4, 2), (37, 8, 3), (1200, 8, 2), (5, 16, 1)]:
        lengths = [rng.randint(5, 500) for _ in range(n)]
        plan = plan_steps(lengths, batch_size, epochs, seed=123)
        assert plan == plan_steps(lengths, batch_size, epochs, seed=123)
        per_epoch = len(plan) // epochs
        assert per_epoch * epochs == len(plan)
        assert all(1 <= len(step) <= batch_size for step in plan)
        for e in range(epochs):
            rows = sorted(i for step in plan[e * per_epoch:(e + 1) * per_epoch] for i in step)
            assert rows == list(range(n))
        if n >= 10:
            assert plan != plan_steps(lengths, batch_size, epochs, seed=124)
    # length grouping: with fewer rows than a mega-batch, each step is a run of the length-sorted order
    lengths = list(range(100, 0, -1))
    for step in plan_steps(lengths, 10, 1, seed=0):
        assert sorted(lengths[i] for i in step) == list(range(min(lengths[i] for i in step),
                                                              max(lengths[i] for i in step) + 1))


# -----------------------------------------------------------------------------
# Learning rate schedule

def test_lr_schedule_warmup_peak_and_decay_to_ten_percent():
    total, peak, warmup = 100, 2e-4, 10
    lrs = [lr_at(s, total, peak, warmup) for s in range(total + 1)]
    assert lrs[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])  # linear rise
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # never rises again
    assert lrs[warmup + 45] == pytest.approx(peak * (0.1 + 0.9 * 0.5))  # halfway through the cosine
    assert lrs[total] == pytest.approx(0.1 * peak)
    assert 0.1 * peak < lrs[total - 1] < 0.11 * peak


# -----------------------------------------------------------------------------
# The loop: learning, determinism, resume, NaN guard

def test_min_steps_raises_the_epochs_of_a_small_set(model_dir, tokenizer):
    # 4 rows, 3 per step: 2 steps an epoch, so 1 epoch is 2 steps and a floor of 7 steps needs 4 epochs
    stats = train(student(model_dir), tokenizer, PAIRS, epochs=1, batch_size=3, min_steps=7, progress=False)
    assert (stats["epochs"], stats["steps"]) == (4, 8)
    stats = train(student(model_dir), tokenizer, PAIRS, epochs=5, batch_size=3, min_steps=7, progress=False)
    assert (stats["epochs"], stats["steps"]) == (5, 10)  # enough epochs already: the floor changes nothing


def test_training_memorises_a_tiny_set(model_dir, tokenizer):
    model = student(model_dir)
    stats = train(model, tokenizer, PAIRS, epochs=30, batch_size=4, lr=1e-2, warmup_frac=0.1, progress=False)
    history = stats["loss_history"]
    assert stats["steps"] == 30 and len(history) == 30
    assert history[-1] < history[0] / 20, history
    assert not model.training  # train() hands the model back ready for evaluation
    for prompt, answer in PAIRS[:2]:
        ids = torch.tensor([tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer) + 3,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == answer


def test_same_seed_same_loss_history_with_dropout(model_dir, tokenizer):
    runs = [train(student(model_dir, dropout=0.3), tokenizer, PAIRS, epochs=4, batch_size=2, lr=5e-3, seed=s,
                  progress=False)["loss_history"] for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def train_killed_at(step_to_die, monkeypatch, *args, **kwargs):
    """Run train() until it is 'killed' (KeyboardInterrupt) as optimizer step `step_to_die` begins."""
    real_lr_at = train_module.lr_at

    def dies(step, *a):
        if step == step_to_die:
            raise KeyboardInterrupt("killed")
        return real_lr_at(step, *a)

    monkeypatch.setattr(train_module, "lr_at", dies)
    with pytest.raises(KeyboardInterrupt):
        train(*args, **kwargs)
    monkeypatch.setattr(train_module, "lr_at", real_lr_at)


def test_resume_after_a_kill_matches_an_uninterrupted_run(model_dir, tokenizer, tmp_path, monkeypatch):
    kwargs = dict(epochs=4, batch_size=2, lr=5e-3, seed=3, progress=False)  # 8 steps, dropout on: RNG must resume
    reference_model = student(model_dir, dropout=0.2)
    reference = train(reference_model, tokenizer, PAIRS, **kwargs)

    checkpoint = str(tmp_path / "train_state.pt")
    train_killed_at(5, monkeypatch, student(model_dir, dropout=0.2), tokenizer, PAIRS, checkpoint_path=checkpoint,
                    checkpoint_every_s=0, **kwargs)

    resumed_model = student(model_dir, dropout=0.2, seed=99)  # a different init: the checkpoint must overwrite it
    resumed = train(resumed_model, tokenizer, PAIRS, checkpoint_path=checkpoint, checkpoint_every_s=0, **kwargs)
    assert resumed["resumed_at_step"] == 5
    assert resumed["loss_history"] == reference["loss_history"]
    want = lora_state(reference_model)
    got = lora_state(resumed_model)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_checkpoint_of_other_data_is_refused(model_dir, tokenizer, tmp_path, monkeypatch):
    checkpoint = str(tmp_path / "train_state.pt")
    kwargs = dict(epochs=4, batch_size=2, lr=5e-3, seed=3, progress=False, checkpoint_path=checkpoint,
                  checkpoint_every_s=0)
    train_killed_at(3, monkeypatch, student(model_dir), tokenizer, PAIRS, **kwargs)
    other = PAIRS[:-1] + [(PAIRS[-1][0], PAIRS[-1][1] + " and more")]
    with pytest.raises(TrainingError, match="different training data or settings"):
        train(student(model_dir), tokenizer, other, **kwargs)
    with pytest.raises(TrainingError, match="different training data or settings"):
        train(student(model_dir), tokenizer, PAIRS, **dict(kwargs, lr=1e-3))
    assert train(student(model_dir), tokenizer, PAIRS, **kwargs)["resumed_at_step"] == 3


def test_nan_guard_names_step_and_lr(model_dir, tokenizer):
    model = student(model_dir)
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.down_proj").base.weight[3, 5] = float("nan")
    with pytest.raises(TrainingError, match=r"loss became nan at step 1/\d+ \(lr [0-9.e-]+\)"):
        train(model, tokenizer, PAIRS, epochs=2, batch_size=2, progress=False)

    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step \d+/\d+ \(lr 1e\+30\)") as err:
        train(student(model_dir), tokenizer, PAIRS, epochs=5, batch_size=4, lr=1e30, warmup_frac=0.0,
              progress=False)
    assert "lower --lr" in str(err.value)


def test_bad_calls_give_clear_errors(model_dir, tokenizer):
    with pytest.raises(TrainingError, match="no training examples"):
        train(student(model_dir), tokenizer, [], progress=False)
    bare = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(TrainingError, match="add_lora"):
        train(bare, tokenizer, PAIRS, progress=False)
    with pytest.raises(TrainingError, match="max-seq-len"):
        train(student(model_dir), tokenizer, PAIRS, max_seq_len=8, progress=False)
    with pytest.raises(TrainingError, match="CUDA"):
        train(student(model_dir), tokenizer, PAIRS, precision="bf16", progress=False)


# -----------------------------------------------------------------------------
# Memory: automatic micro-batch size, activation checkpointing

QWEN_05B = LlamaConfig(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936)
GiB = 2 ** 30


def test_auto_micro_batch_tokens_from_fake_free_memory():
    per_token = activation_bytes_per_token(QWEN_05B, element_bytes=2, lora_dropout=0.05)
    # by hand: 24 layers + 1 of 2 (13 H + 3.5 I) + 3 (6 H + I) bytes, plus 16 H outside the layers
    layer = 2 * (13 * 896 + 3.5 * 4864) + 3 * (6 * 896 + 4864)
    assert per_token == int(25 * layer + 16 * 896)
    tokens = auto_micro_batch_tokens(70 * GiB, QWEN_05B, element_bytes=2, lora_dropout=0.05)
    assert tokens == int((0.85 * 70 * GiB - 1.5 * GiB) // per_token) // 256 * 256
    assert tokens % 256 == 0 and 20_000 < tokens < 40_000
    # more memory, more tokens; checkpointing keeps one hidden vector per layer, so far more tokens fit
    assert auto_micro_batch_tokens(30 * GiB, QWEN_05B) < tokens
    checkpointed = auto_micro_batch_tokens(70 * GiB, QWEN_05B, element_bytes=2, lora_dropout=0.05,
                                           grad_checkpoint=True)
    assert checkpointed > 64 * 1024 > 4 * tokens / 2  # a 64k-token micro-batch of the 0.5B shape fits in 70 GiB
    # fp32 activations cost more; no free memory still gives a usable minimum; eager attention pays per length
    assert auto_micro_batch_tokens(70 * GiB, QWEN_05B, element_bytes=4, lora_dropout=0.05) < tokens
    assert auto_micro_batch_tokens(1 * GiB, QWEN_05B) == 256
    eager = LlamaConfig(**QWEN_05B.to_dict())
    eager._attn_implementation = "eager"
    assert activation_bytes_per_token(eager, max_seq_len=2048) > activation_bytes_per_token(QWEN_05B,
                                                                                          max_seq_len=2048)


def saved_bytes_per_token(model, input_ids, mask):
    """Bytes autograd keeps for backward of one loss computation, per input token (each storage counted once)."""
    storages = {}
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_loss_sum(model, input_ids, mask)
    return sum(n for ptr, n in storages.items() if ptr not in frozen) / input_ids.numel()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_estimate_covers_what_autograd_keeps(dropout):
    # Llama-style shapes with the MLP ratios of Qwen2.5 (5.4) and Llama-2 (2.7), in fp32: the estimate is never
    # below the measurement, with and without checkpointing, and not wildly above it
    for hidden, inner, kv_heads in ((128, 692, 2), (128, 344, 8)):
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inner, num_hidden_layers=3, num_attention_heads=8,
                             num_key_value_heads=kv_heads, vocab_size=300)
        torch.manual_seed(0)
        model = lora.add_lora(LlamaForCausalLM(config), r=8, alpha=16, dropout=dropout, verbose=False).train()
        input_ids = torch.randint(0, 300, (2, 96))
        mask = torch.zeros(2, 95, dtype=torch.bool)
        mask[:, 40:] = True
        for checkpointing in (False, True):
            if checkpointing:
                train_module.set_grad_checkpointing(model, True)
            measured = saved_bytes_per_token(model, input_ids, mask)
            estimate = activation_bytes_per_token(model.config, element_bytes=4, lora_dropout=dropout,
                                                  grad_checkpoint=checkpointing)
            assert measured < estimate, (hidden, inner, checkpointing)
            if not checkpointing:  # (with it, the estimate also covers the layer recomputed during backward)
                assert estimate < 2 * measured, (hidden, inner)
        train_module.set_grad_checkpointing(model, False)


def test_grad_checkpoint_gives_the_same_loss_and_gradients_with_less_kept(model_dir, tokenizer):
    encoded = [encode_pair(tokenizer, p, r, 1024) for p, r in PAIRS]
    input_ids, mask = collate(encoded, tokenizer.pad_token_id, torch.device("cpu"))
    results = []
    for checkpointing in (False, True):
        model = student(model_dir, dropout=0.3).train()  # dropout on: the recompute must replay the same masks
        with torch.no_grad():
            for m in (m for _, m in lora.lora_modules(model)):
                m.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            train_module.set_grad_checkpointing(model, True)
        kept = saved_bytes_per_token(model, input_ids, mask)
        torch.manual_seed(5)
        loss = response_loss_sum(model, input_ids, mask)
        params = [p for _, m in lora.lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]
        results.append((kept, loss.detach(), torch.autograd.grad(loss, params)))
    (kept_full, loss_full, grads_full), (kept_ckpt, loss_ckpt, grads_ckpt) = results
    assert kept_ckpt < kept_full / 2
    torch.testing.assert_close(loss_ckpt, loss_full, rtol=1e-6, atol=0)
    for a, b in zip(grads_ckpt, grads_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # through train(): the same loss history, and the model handed back without checkpointing
    runs = []
    for checkpointing in (False, True):
        model = student(model_dir, dropout=0.3)
        runs.append(train(model, tokenizer, PAIRS, epochs=2, batch_size=2, lr=5e-3, grad_checkpoint=checkpointing,
                          progress=False)["loss_history"])
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_micro_batch_tokens_auto_is_4096_on_cpu_and_bad_values_are_refused(model_dir, tokenizer, capsys):
    train(student(model_dir), tokenizer, PAIRS, epochs=1, batch_size=4)
    assert "micro-batches of <= 4096 tokens" in capsys.readouterr().out
    for bad in ("big", 0, -1, 2.5):
        with pytest.raises(TrainingError, match="'auto' or a positive whole number"):
            train(student(model_dir), tokenizer, PAIRS, micro_batch_tokens=bad, progress=False)


def test_frozen_weights_cast_once_and_never_again_under_autocast(model_dir, tokenizer):
    # what train() does on CUDA with bf16, checked with CPU autocast (the same casting rules): after the one cast,
    # a forward + backward casts no base weight; only the fp32 LoRA weights are cast, once each per autocast region
    from torch.utils._python_dispatch import TorchDispatchMode
    model = student(model_dir).train()
    lora_params = [p for _, m in lora.lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert train_module.cast_frozen_weights(model, torch.bfloat16) == frozen
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in lora_params)  # master weights, and so AdamW state, stay fp32
    assert train_module.cast_frozen_weights(model, torch.bfloat16) == 0

    frozen_shapes = {tuple(p.shape) for p in model.parameters() if not p.requires_grad}
    casts = []

    class RecordCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 2:
                casts.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    encoded = [encode_pair(tokenizer, p, r, 1024) for p, r in PAIRS]
    input_ids, mask = collate(encoded, tokenizer.pad_token_id, torch.device("cpu"))
    with RecordCasts(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = response_loss_sum(model, input_ids, mask)
    loss.backward()
    assert not [shape for shape in casts if shape in frozen_shapes]
    lora_shapes = {tuple(p.shape) for p in lora_params} | {tuple(p.shape[::-1]) for p in lora_params}
    assert 0 < len([shape for shape in casts if shape in lora_shapes]) <= len(lora_params)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_params)


# -----------------------------------------------------------------------------
# --compile: bucketed shapes

def test_bucketed_collate_pads_to_multiples_and_changes_nothing_else():
    assert [bucket(n, 64) for n in (1, 63, 64, 65, 200)] == [64, 64, 64, 128, 256]
    assert bucket(37, 1) == 37
    examples = [([11, 12, 13, 14, 15], 2), ([21, 22, 23], 1)]
    plain_ids, plain_mask = collate(examples, 0, torch.device("cpu"))
    ids, mask = collate(examples, 0, torch.device("cpu"), width_multiple=64)
    assert ids.shape == (2, 64) and mask.shape == (2, 63)
    assert torch.equal(ids[:, :5], plain_ids) and not ids[:, 5:].any()
    assert torch.equal(mask[:, :4], plain_mask) and not mask[:, 4:].any()


def test_compile_trains_the_compiled_decoder_on_bucketed_shapes(model_dir, tokenizer, monkeypatch):
    # torch.compile with the eager backend (graph capture without code generation, quick on CPU): the loop must
    # run the compiled decoder, on widths that are multiples of 64, and reach the loss of the uncompiled loop
    compiled, widths = [], []
    real_compile = torch.compile

    def eager_compile(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager")

    real_loss = train_module.response_loss_sum

    def spy(model, input_ids, target_mask, body=None):
        widths.append(input_ids.shape[1])
        assert body is not None and body is not model.base_model
        return real_loss(model, input_ids, target_mask, body)

    reference = train(student(model_dir), tokenizer, PAIRS, epochs=2, batch_size=2, lr=5e-3,
                      progress=False)["loss_history"]
    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(train_module, "response_loss_sum", spy)
    torch._dynamo.reset()
    model = student(model_dir)
    history = train(model, tokenizer, PAIRS, epochs=2, batch_size=2, lr=5e-3, compile=True,
                    progress=False)["loss_history"]
    assert compiled == [model.base_model]
    assert widths and all(w % 64 == 0 for w in widths)
    assert history == pytest.approx(reference, rel=1e-5)
