"""LoRA adapters for Hugging Face causal LMs, written out by hand (no peft at runtime).

The method (Hu et al., 2021). A frozen linear layer y = x W^T + b gets a trainable low-rank update:

    W' = W + (alpha / r) * B A          A: (r, in_features), B: (out_features, r)
    y  = x W^T + b + (alpha / r) * dropout(x) A^T B^T

A starts random (Kaiming-uniform, as in the paper's reference code and peft) and B starts at zero, so a fresh
adapter leaves the model exactly unchanged. Only A and B train; the base weights never receive gradients, which is
what makes a LoRA step cost about 4 (not 6) x parameters FLOPs per token. This is plain LoRA with the standard
alpha / r scaling: no rsLoRA, DoRA, bias training, QLoRA or per-layer ranks.

On disk an adapter is `adapter_model.safetensors` + `adapter_config.json` in peft's layout (key names
`base_model.model.<module>.lora_A.weight`, the same config fields), so `peft.PeftModel.from_pretrained(base, dir)`
and vLLM's LoRA support read it as is. `merge_lora` folds B A into W for fast inference and `unload_lora` hands back
plain `nn.Linear` modules, so the merged model saves with `save_pretrained`.

Usage:
    from lora import add_lora, save_adapter, load_adapter, merge_lora
    add_lora(model, r=8, alpha=16, dropout=0.05)        # prints trainable / total parameters
    ... train the parameters with requires_grad ...
    save_adapter(model, "out/adapter")
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# All attention and MLP projections of the common decoder families. Llama, Mistral, Qwen2/3, SmolLM, Gemma use
# q/k/v/o + gate/up/down; Phi-3 fuses them (qkv_proj, gate_up_proj); GPT-2 uses Conv1D c_attn / c_proj / c_fc.
# Embeddings and lm_head are deliberately never targets: they are tied or huge, and LoRA on them buys little.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "qkv_proj", "gate_up_proj", "c_attn", "c_proj", "c_fc")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class LoRAError(ValueError):
    pass


# -----------------------------------------------------------------------------
# The adapter module

def _is_conv1d(module):
    # transformers' GPT-2 Conv1D is a linear layer that stores its weight as (in, out): peft calls this fan_in_fan_out
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear (or GPT-2 Conv1D) and adds (alpha/r) * B A on a dropout of its input."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        if r <= 0:
            raise LoRAError(f"LoRA rank must be positive, got r={r}")
        if not 0 <= dropout < 1:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.fan_in_fan_out = _is_conv1d(base)
        in_features, out_features = (base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1])
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # A and B live in fp32 whatever the base dtype: they are the master weights AdamW updates, and bf16 master
        # weights lose small updates. Under autocast the matmuls still run in the low-precision dtype.
        device = base.weight.device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.train(base.training)  # an adapter added to a model in eval mode must not switch its dropout on

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self):
        """(alpha/r) B A in the base weight's own layout and dtype."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return (delta.T if self.fan_in_fan_out else delta).to(self.base.weight.dtype)

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        alpha = self.scaling
        if self.training and isinstance(self.lora_dropout, nn.Dropout):  # no dropout work at p=0 or in eval mode
            p = self.lora_dropout.p
            if x.device.type == "cuda":
                x = F.dropout(x, p)  # one fused kernel
            else:
                # on CPU a bool mask and a where cost half of F.dropout's float mask and two multiplies; the
                # 1/(1-p) of inverted dropout rides in the addmm's alpha instead
                x = torch.where(torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p), x, 0.0)
                alpha = self.scaling / (1 - p)
        a, b = self.lora_A.weight, self.lora_B.weight
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            # a bf16 base without autocast (evaluation of an unmerged adapter) still feeds fp32 adapters
            return out + (F.linear(F.linear(x.to(a.dtype), a), b) * alpha).to(out.dtype)
        # out += alpha * (x A^T) B^T in one in-place addmm: B's matmul, the scaling and the add are one kernel, and
        # no copy of out is made (the base's backward does not need its output). Under autocast A is cast once per
        # autocast region (a cached cast of a trainable leaf) and B here, to the dtype of the base output.
        down = F.linear(x, a).reshape(-1, self.r)
        out.view(-1, out.shape[-1]).addmm_(down, b.t().to(out.dtype), alpha=alpha)
        return out

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


# -----------------------------------------------------------------------------
# Adding, removing and merging adapters across a model

def lora_modules(model):
    """(name, LoRALinear) pairs, names as in the unwrapped model (no '.base')."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]


def _set_submodule(model, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def add_lora(model, r=8, alpha=16, dropout=0.0, targets=DEFAULT_TARGETS, verbose=True):
    """Freeze the model and put a fresh LoRALinear on every linear whose name ends with one of `targets`."""
    if lora_modules(model):
        raise LoRAError("model already has LoRA adapters: call remove_lora(model) first for a fresh adapter")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = tuple(targets)
    matched = []
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)) or module is output_embeddings:
            continue
        if name.rsplit(".", 1)[-1] in targets:
            _set_submodule(model, name, LoRALinear(module, r, alpha, dropout))
            matched.append(name)
    if not matched:
        names = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(model)})
        raise LoRAError(f"LoRA targets {list(targets)} match no linear layer of this model; "
                        f"its linear layers are named: {names}")
    if verbose:
        trainable, total = count_parameters(model)
        print(f"LoRA r={r} alpha={alpha} on {len(matched)} layers: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.2f}%)")
    return model


def remove_lora(model):
    """Drop every adapter (unmerging first), giving back the original frozen modules."""
    for name, m in lora_modules(model):
        if m.merged:
            unmerge_lora_module(m)
        _set_submodule(model, name, m.base)
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold (alpha/r) B A into each base weight; the adapters stay attached but are skipped in forward."""
    for _, m in lora_modules(model):
        if not m.merged:
            m.base.weight += m.delta_weight()
            m.merged = True
    return model


@torch.no_grad()
def unmerge_lora_module(m):
    # Subtracting is exact up to one rounding of W + delta: negligible in fp32, visible in bf16/fp16 weights, so keep
    # an unmerged copy when you need bit-exact base weights in low precision.
    m.base.weight -= m.delta_weight()
    m.merged = False


def unmerge_lora(model):
    for _, m in lora_modules(model):
        if m.merged:
            unmerge_lora_module(m)
    return model


def unload_lora(model):
    """Merge and replace every LoRALinear by its plain base module: a normal model for save_pretrained."""
    merge_lora(model)
    for name, m in lora_modules(model):
        _set_submodule(model, name, m.base)
    return model


# -----------------------------------------------------------------------------
# peft-compatible save and load

def adapter_config(model, base_model_name_or_path=None):
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("model has no LoRA adapters to save")
    first = mods[0][1]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in mods}),
        "fan_in_fan_out": first.fan_in_fan_out, "bias": "none", "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_adapter(model, out_dir, base_model_name_or_path=None):
    """Write adapter_model.safetensors + adapter_config.json (atomically, so a kill never leaves half a file)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name, m in lora_modules(model):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu", torch.float32).contiguous()
    config = adapter_config(model, base_model_name_or_path)
    weights_path, config_path = os.path.join(out_dir, ADAPTER_WEIGHTS), os.path.join(out_dir, ADAPTER_CONFIG)
    save_file(tensors, weights_path + ".tmp", metadata={"format": "pt"})
    with open(config_path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(weights_path + ".tmp", weights_path)
    os.replace(config_path + ".tmp", config_path)


def load_adapter(model, adapter_dir):
    """Attach the adapter in `adapter_dir` (ours or peft's) to a model without adapters, or refill existing ones."""
    config_path, weights_path = os.path.join(adapter_dir, ADAPTER_CONFIG), os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise LoRAError(f"{path} not found: an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        with open(config_path) as f:
            config = json.load(f)
        if not isinstance(config, dict) or not isinstance(config.get("target_modules"), (str, list)) or not all(
                isinstance(config.get(k), (int, float)) for k in ("r", "lora_alpha")):
            raise ValueError("not an adapter config with target_modules, r and lora_alpha")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoRAError(f"{config_path} is damaged ({str(e).splitlines()[0][:120]}): restore it, or delete the "
                        f"adapter folder so that its training is redone") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise LoRAError(f"{config_path}: only plain LoRA adapters are supported (no DoRA / rsLoRA)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoRAError(f"{config_path}: per-layer ranks or alphas are not supported")
    if not lora_modules(model):
        targets = config["target_modules"]
        add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                 targets=[targets] if isinstance(targets, str) else targets, verbose=False)
    try:
        state = load_file(weights_path)
    except Exception as e:  # a truncated or foreign file: safetensors says why
        raise LoRAError(f"{weights_path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}): restore "
                        f"it, or delete the adapter folder so that its training is redone") from None
    # peft writes keys without the adapter name; some older tools keep ".default" in them
    state = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
             for k, v in state.items()}
    expected = set()
    with torch.no_grad():
        for name, m in lora_modules(model):
            for part in ("lora_A", "lora_B"):
                key = f"{PEFT_PREFIX}{name}.{part}.weight"
                expected.add(key)
                if key not in state:
                    raise LoRAError(f"{weights_path} has no tensor {key}: adapter and model do not match")
                param = getattr(m, part).weight
                if state[key].shape != param.shape:
                    raise LoRAError(f"{weights_path}: {key} has shape {tuple(state[key].shape)}, "
                                    f"the model needs {tuple(param.shape)}")
                param.copy_(state[key])
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise LoRAError(f"{weights_path} has tensors this model has no place for, e.g. {unexpected[:3]}")
    return model
