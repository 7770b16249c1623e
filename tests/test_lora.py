"""Tests for lora.py on tiny random Llama and GPT-2 models (CPU, no network, a few seconds).

    python -m pytest -q tests/test_lora.py

The models are saved and reloaded through the real `from_pretrained` path, so the modules under test are exactly
those a user gets. peft is the independent reference: an adapter we write must load in peft with the same logits,
and an adapter peft writes must load in ours with peft's logits. GPT-2 matters because its Conv1D layers store
weights transposed (peft's fan_in_fan_out), the classic place for a LoRA implementation to be silently wrong.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lora  # noqa: E402
from lora import LoRAError, LoRALinear, add_lora, load_adapter, save_adapter  # noqa: E402

peft = pytest.importorskip("peft")

VOCAB = 300
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


# -----------------------------------------------------------------------------
# Tiny models, written to disk once per session and reloaded fresh for every test: peft and our code both mutate
# the model in place, so sharing one instance between tests would hide bugs.

@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(seed=0, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


@torch.no_grad()
def perturb(model, seed=1, scale=0.1):
    """Random A and B everywhere, so the adapter really changes the outputs (a fresh B = 0 would hide everything)."""
    g = torch.Generator().manual_seed(seed)
    for _, m in lora.lora_modules(model):
        m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * scale)
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)


@torch.no_grad()
def perturb_peft(peft_model, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(peft_model.named_parameters()):
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


MODELS = [("llama", LLAMA_TARGETS, 14), ("gpt2", GPT2_TARGETS, 8)]  # name, targets, wrapped layers in 2 blocks


@pytest.fixture(params=MODELS, ids=[m[0] for m in MODELS])
def case(request, llama_dir, gpt2_dir):
    name, targets, n_layers = request.param
    return {"name": name, "dir": llama_dir if name == "llama" else gpt2_dir, "targets": targets,
            "n_layers": n_layers}


# -----------------------------------------------------------------------------
# A fresh adapter is a no-op; merging, unmerging and unloading preserve the function

def test_fresh_adapter_leaves_outputs_exactly_unchanged(case):
    ids = tokens()
    base = logits(load(case["dir"]), ids)
    model = add_lora(load(case["dir"]), r=4, alpha=8, verbose=False)
    assert len(lora.lora_modules(model)) == case["n_layers"]
    assert all(m.lora_B.weight.abs().sum() == 0 for _, m in lora.lora_modules(model))
    assert all(m.lora_A.weight.abs().sum() > 0 for _, m in lora.lora_modules(model))  # A random, not zero
    assert torch.equal(logits(model, ids), base)


def test_merge_unmerge_and_unload(case, tmp_path):
    ids = tokens()
    model = add_lora(load(case["dir"]), r=4, alpha=8, verbose=False)
    base_weights = {n: m.base.weight.detach().clone() for n, m in lora.lora_modules(model)}
    base = logits(model, ids)
    perturb(model)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3  # the perturbation is visible, so the comparisons below mean something

    lora.merge_lora(model)
    assert all(m.merged for _, m in lora.lora_modules(model))
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=1e-4)
    lora.merge_lora(model)  # merging twice must not add the delta twice
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=1e-4)

    lora.unmerge_lora(model)
    for n, m in lora.lora_modules(model):
        torch.testing.assert_close(m.base.weight, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=1e-4)

    lora.unload_lora(model)
    assert not lora.lora_modules(model)
    assert not any(isinstance(m, LoRALinear) or "lora" in n for n, m in model.named_modules())
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    reloaded = load(tmp_path / "merged")
    assert not any("lora" in k for k in reloaded.state_dict())
    torch.testing.assert_close(logits(reloaded, ids), adapted, atol=1e-5, rtol=1e-4)


def test_merged_weight_is_w_plus_scaled_ba_by_hand(llama_dir, gpt2_dir):
    # Independent of forward(): the merged weight is W + (alpha/r) B A, transposed for GPT-2's (in, out) Conv1D.
    for path, name, transpose in [(llama_dir, "model.layers.0.self_attn.q_proj", False),
                                  (gpt2_dir, "transformer.h.0.attn.c_attn", True)]:
        model = add_lora(load(path), r=4, alpha=12, verbose=False)
        perturb(model)
        m = model.get_submodule(name)
        w0 = m.base.weight.detach().clone()
        delta = 3.0 * m.lora_B.weight.detach() @ m.lora_A.weight.detach()
        lora.merge_lora(model)
        torch.testing.assert_close(m.base.weight, w0 + (delta.T if transpose else delta))


def test_remove_lora_restores_the_original_modules(case):
    ids = tokens()
    base = logits(load(case["dir"]), ids)
    model = add_lora(load(case["dir"]), r=4, alpha=8, verbose=False)
    perturb(model)
    lora.merge_lora(model)
    lora.remove_lora(model)
    assert not lora.lora_modules(model)
    torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=1e-4)
    add_lora(model, r=2, alpha=2, verbose=False)  # and a fresh adapter can go on again
    with pytest.raises(LoRAError, match="already has LoRA"):
        add_lora(model, verbose=False)


# -----------------------------------------------------------------------------
# Save / load in peft's layout

def test_save_load_round_trip_and_peft_layout(case, tmp_path):
    ids = tokens()
    model = add_lora(load(case["dir"]), r=4, alpha=8, dropout=0.05, targets=case["targets"], verbose=False)
    perturb(model)
    expected = logits(model.eval(), ids)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="some/base")

    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["base_model_name_or_path"] == "some/base"
    assert sorted(config["target_modules"]) == sorted(case["targets"])
    assert config["fan_in_fan_out"] is (case["name"] == "gpt2")
    assert config["bias"] == "none" and not config["use_dora"] and not config["use_rslora"]

    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    names = [n for n, _ in lora.lora_modules(model)]
    assert set(state) == {f"base_model.model.{n}.lora_{p}.weight" for n in names for p in "AB"}
    first = model.get_submodule(names[0])
    assert state[f"base_model.model.{names[0]}.lora_A.weight"].shape == (4, first.lora_A.in_features)
    assert state[f"base_model.model.{names[0]}.lora_B.weight"].shape == (first.lora_B.out_features, 4)
    if case["name"] == "llama":
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    else:
        assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in state
        assert state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * 64, 4)

    fresh = load_adapter(load(case["dir"]), tmp_path / "adapter").eval()
    assert torch.equal(logits(fresh, ids), expected)

    # refilling a model that already has adapters of the same shape also works
    other = add_lora(load(case["dir"]), r=4, alpha=8, targets=case["targets"], verbose=False)
    load_adapter(other, tmp_path / "adapter").eval()
    assert torch.equal(logits(other, ids), expected)


def test_ours_loads_in_peft_with_same_logits(case, tmp_path):
    ids = tokens(seed=3)
    model = add_lora(load(case["dir"]), r=4, alpha=16, targets=case["targets"], verbose=False)
    perturb(model, seed=7)
    ours = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(load(case["dir"]), str(tmp_path / "adapter")).eval()
    theirs = logits(reference, ids)
    assert (theirs - logits(load(case["dir"]), ids)).abs().max() > 1e-3  # peft did apply the adapter
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_peft_adapter_loads_in_ours_with_peft_logits(case, tmp_path):
    ids = tokens(seed=4)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=case["targets"],
                             fan_in_fan_out=case["name"] == "gpt2", task_type="CAUSAL_LM")
    reference = peft.get_peft_model(load(case["dir"]), config)
    perturb_peft(reference, seed=5)
    reference.eval()
    theirs = logits(reference, ids)
    reference.save_pretrained(tmp_path / "peft_adapter")

    ours = load_adapter(load(case["dir"]), tmp_path / "peft_adapter").eval()
    assert len(lora.lora_modules(ours)) == case["n_layers"]
    assert (theirs - logits(load(case["dir"]), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, ids), theirs, atol=1e-5, rtol=1e-4)


def test_load_adapter_errors_are_clear(llama_dir, gpt2_dir, tmp_path):
    with pytest.raises(LoRAError, match="adapter_config.json"):
        load_adapter(load(llama_dir), tmp_path / "nowhere")
    model = add_lora(load(llama_dir), r=4, alpha=8, verbose=False)
    save_adapter(model, tmp_path / "r4")
    wrong_rank = add_lora(load(llama_dir), r=8, alpha=8, verbose=False)
    with pytest.raises(LoRAError, match="shape"):
        load_adapter(wrong_rank, tmp_path / "r4")
    with pytest.raises(LoRAError):  # a Llama adapter on GPT-2: its target names match nothing there
        load_adapter(load(gpt2_dir), tmp_path / "r4")
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAError, match="DoRA"):
        load_adapter(load(llama_dir), tmp_path / "r4")


# -----------------------------------------------------------------------------
# What gets wrapped and what trains

def test_unmatched_targets_list_the_linear_layer_names(llama_dir, gpt2_dir):
    with pytest.raises(LoRAError) as err:
        add_lora(load(llama_dir), targets=["query", "value"], verbose=False)
    message = str(err.value)
    for name in LLAMA_TARGETS + ["lm_head"]:
        assert name in message
    with pytest.raises(LoRAError) as err:
        add_lora(load(gpt2_dir), targets=["q_proj"], verbose=False)
    assert all(name in str(err.value) for name in GPT2_TARGETS)


def test_lm_head_and_embeddings_never_wrapped(case):
    # Asking for lm_head / embeddings explicitly must still leave them alone (they are tied or huge).
    model = add_lora(load(case["dir"]), targets=case["targets"] + ["lm_head", "embed_tokens", "wte", "wpe"],
                     verbose=False)
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    assert not isinstance(model.get_input_embeddings(), LoRALinear)
    wrapped = [n for n, _ in lora.lora_modules(model)]
    assert len(wrapped) == case["n_layers"]
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in wrapped)


def test_only_lora_parameters_train_and_count_matches(case, capsys):
    model = add_lora(load(case["dir"]), r=4, alpha=8, targets=case["targets"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expected = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for _, m in lora.lora_modules(model))
    # by hand for the tiny Llama: per layer r * (in + out) summed over the 7 projections
    if case["name"] == "llama":
        kv = 64 // 4 * 2  # 2 kv heads of size 16
        per_block = 4 * ((64 + 64) * 2 + (64 + kv) * 2 + (64 + 128) * 2 + (128 + 64))
        assert expected == 2 * per_block
    assert lora.count_parameters(model)[0] == expected
    assert f"{expected:,} trainable" in capsys.readouterr().out
    # a backward pass reaches A and B and nothing else
    model.train()
    model(input_ids=tokens()).logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_dropout_only_on_the_lora_input(llama_dir):
    ids = tokens()
    base = logits(load(llama_dir), ids)
    model = add_lora(load(llama_dir), r=4, alpha=8, dropout=0.5, verbose=False)
    # B == 0: in train mode the dropout mask hits only the (zero) LoRA path, so outputs equal the base exactly
    model.train()
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    perturb(model)
    model.train()
    torch.manual_seed(0)
    a = logits(model, ids)
    torch.manual_seed(1)
    b = logits(model, ids)
    assert (a - b).abs().max() > 1e-4  # dropout is active in train mode
    model.eval()
    assert torch.equal(logits(model, ids), logits(model, ids))  # and off in eval mode

    # the base path of a single layer is untouched: its output minus the base output is the LoRA path alone
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    layer.train()
    x = torch.randn(3, 64)
    torch.manual_seed(2)
    lora_path = layer(x) - layer.base(x)
    torch.manual_seed(2)
    mask_source = layer.lora_dropout(x)  # the same dropout draw, taken by hand
    torch.testing.assert_close(lora_path, layer.lora_B(layer.lora_A(mask_source)) * layer.scaling,
                               atol=1e-6, rtol=1e-5)
    assert (mask_source == 0).any()


def test_adapters_added_to_an_eval_model_stay_in_eval_mode(llama_dir, tmp_path):
    # an adapter loaded for evaluation must not bring its dropout back on: predictions would be random
    model = add_lora(load(llama_dir), r=4, alpha=8, dropout=0.5, verbose=False)
    perturb(model)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(load(llama_dir), tmp_path / "adapter")  # no .eval() afterwards, as an evaluator would
    assert not fresh.training
    assert not any(m.training for _, m in lora.lora_modules(fresh))
    ids = tokens()
    assert torch.equal(logits(fresh, ids), logits(fresh, ids))


def test_bad_rank_is_rejected(llama_dir):
    with pytest.raises(LoRAError, match="rank"):
        add_lora(load(llama_dir), r=0, verbose=False)


def test_forward_and_gradients_match_the_formula_by_hand(llama_dir, gpt2_dir):
    # y = x W^T + b + (alpha/r) x A^T B^T, written out with plain matmuls, for Linear and Conv1D (weight stored
    # transposed); the gradients of A and B too, since training differentiates through the fused addmm
    for path, name in ((llama_dir, "model.layers.0.mlp.up_proj"), (gpt2_dir, "transformer.h.0.mlp.c_fc")):
        model = add_lora(load(path), r=4, alpha=8, verbose=False)
        perturb(model)
        layer = model.get_submodule(name).train()
        x = torch.randn(2, 5, layer.lora_A.weight.shape[1])
        w = layer.base.weight.detach()
        w = w.T if layer.fan_in_fan_out else w
        bias = layer.base.bias if layer.base.bias is not None else 0.0
        a, b = (layer.lora_A.weight.detach().clone().requires_grad_(), layer.lora_B.weight.detach().clone()
                .requires_grad_())
        want = x @ w.T + bias + 2.0 * (x @ a.T) @ b.T
        got = layer(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        grad_out = torch.randn_like(want)
        want.backward(grad_out)
        got.backward(grad_out)
        torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_bf16_base_without_autocast_keeps_fp32_adapters(llama_dir):
    model = add_lora(load(llama_dir), r=4, alpha=8, verbose=False)
    perturb(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 64)
    want = layer(x)
    layer.base.to(torch.bfloat16)
    got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def test_no_dropout_draw_at_p0_or_in_eval(llama_dir):
    # no work for a dropout that does nothing: the random generator is untouched at p=0 and in eval mode
    for p, train_mode, draws in ((0.0, True, False), (0.3, False, False), (0.3, True, True)):
        model = add_lora(load(llama_dir), r=4, alpha=8, dropout=p, verbose=False)
        layer = model.get_submodule("model.layers.0.self_attn.q_proj").train(train_mode)
        x = torch.randn(3, 64)
        before = torch.get_rng_state()
        layer(x)
        assert (not torch.equal(torch.get_rng_state(), before)) == draws, (p, train_mode)
    with pytest.raises(LoRAError, match="dropout"):
        add_lora(load(llama_dir), dropout=1.0, verbose=False)
