"""Shared test fixtures: tiny random models with a real tokenizer, saved and reloaded through from_pretrained.

Tests marked `slow` use the real SmolLM2-135M-Instruct built by ../shared/models/smollm2.sh; they are skipped when
that script is not beside the checkout. Run everything with `python -m pytest -q tests/`.
"""
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
          "How many clips did Natalia sell altogether?", "The answer is 72. #### 72", "Question: Answer:",
          "positive negative neutral 0 1 2 3 4 5 6 7 8 9 + - * / = $ ,"] * 20


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real SmolLM2-135M-Instruct model (minutes on CPU)")


def build_tokenizer(chat_template=True):
    """A real byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def save_tiny(path, kind="llama", chat_template=True, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    tokenizer = build_tokenizer(chat_template)
    torch.manual_seed(seed)
    if kind == "llama":
        # a wide init keeps logits well apart, so float rounding never flips a greedy choice between two paths
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             initializer_range=0.1, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                            initializer_range=0.1, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def load_pretrained(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", chat_template=False)


@pytest.fixture(scope="session")
def smollm2_dir():
    script = SHARED / "models" / "smollm2.sh"
    if not script.exists():
        pytest.skip(f"{script} not found: the real-model tests need ../shared beside the checkout")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        pytest.fail(f"{script} failed:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def gsm8k_test_file():
    path = SHARED / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


class ScriptedHandler(BaseHTTPRequestHandler):
    """The base of the tests' scripted OpenAI-compatible teachers: quiet, JSON replies, and GET /v1/models listing
    one model, "scripted". A test's subclass answers POST /v1/chat/completions as its script says."""

    def log_message(self, *args):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "scripted", "object": "model"}]})
