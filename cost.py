"""Teacher cost: FLOPs and dollars from the tokens a run used, and the budgets that stop asking the teacher.

Bansal et al. (2024) show that at equal compute many samples from a weaker, cheaper teacher can beat a few from a
strong one, so a teacher's cost is a first-class number here. Every iteration's metrics row holds its
teacher_flops and teacher_cost_usd; --teacher-budget-tokens/-flops/-usd stop the loop once spent.

    from cost import teacher_flops
    teacher_flops(cfg, prompt_tokens=1200, completion_tokens=300)    # 2 * cfg.teacher_params * 1500
"""
import torch

from config import RunError

# -----------------------------------------------------------------------------
# Teacher cost. A teacher is paid in compute or in money, and both are linear in tokens: a forward pass costs about
# 2 * params FLOPs per token, prompt and completion alike, and an API bills prompt and completion tokens at their own
# prices. The two count the prompt differently when a request asks for n samples: an API bills its prompt once, but
# the server prefills it once per sample row, so FLOPs count the prompt n times. So every cost is a function of the prompt and completion tokens the run used, which the metrics record per
# iteration (cached replies included): a FLOPs or dollar budget stops, and resumes, exactly as the token budget does.

def count_parameters(name):
    """The parameter count of a model folder or Hugging Face id, from its config alone: the model is built on the
    meta device, so no weight is read or allocated; tied weights count once."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def teacher_flops(cfg, prompt_tokens, completion_tokens):
    """2 * params * tokens, or None when the teacher's size is unknown (an endpoint without --teacher-params).
    prompt_tokens are the prompt tokens as computed: a request for n samples prefills its prompt once per sample
    (our server does; a server with prefix caching computes less), although an API bills it once."""
    return None if cfg.teacher_params is None else 2 * cfg.teacher_params * (prompt_tokens + completion_tokens)


def teacher_cost_usd(cfg, prompt_tokens, completion_tokens):
    """Dollars at --teacher-price-in/-out (per million tokens), or None without prices."""
    if cfg.teacher_price_in is None:
        return None
    return (prompt_tokens * cfg.teacher_price_in + completion_tokens * cfg.teacher_price_out) / 1e6


def reached(used, budget):
    # a budget a user wrote as the cost of N replies must stop after N, whatever the float rounding of the sums
    return used >= budget * (1 - 1e-9)


def budgets_spent(cfg, prompt_tokens, completion_tokens, prompt_computed=None):
    """The budgets the given usage has reached, as words for the stop message. Tokens and dollars count prompt
    tokens as billed; FLOPs count them as computed (prompt_computed, default: as billed)."""
    spent = []
    if cfg.teacher_budget_tokens is not None and prompt_tokens + completion_tokens >= cfg.teacher_budget_tokens:
        spent.append(f"teacher token budget of {cfg.teacher_budget_tokens}")
    if cfg.teacher_budget_flops is not None and reached(teacher_flops(cfg, prompt_computed if prompt_computed is not None
                                                                      else prompt_tokens, completion_tokens),
                                                        cfg.teacher_budget_flops):
        spent.append(f"teacher FLOPs budget of {cfg.teacher_budget_flops:.4g}")
    if cfg.teacher_budget_usd is not None and reached(teacher_cost_usd(cfg, prompt_tokens, completion_tokens),
                                                      cfg.teacher_budget_usd):
        spent.append(f"teacher budget of ${cfg.teacher_budget_usd:g}")
    return spent


def resolve_teacher_cost(cfg):
    """Check the cost flags and fill in the embedded teacher's parameter count (so config.json records it). Returns
    a line describing the cost accounting, for the start of the run."""
    for name in ("teacher_params", "teacher_price_in", "teacher_price_out", "teacher_budget_flops",
                 "teacher_budget_usd"):
        value = getattr(cfg, name)
        if value is not None and (value != value or value < 0 or (name == "teacher_params" and value == 0)):
            least = "positive" if name == "teacher_params" else "zero or more"
            raise RunError(f"--{name.replace('_', '-')} must be {least}, got {value}")
    if (cfg.teacher_price_in is None) != (cfg.teacher_price_out is None):
        raise RunError("give both --teacher-price-in and --teacher-price-out (USD per million prompt and completion "
                       "tokens; 0 for a side that is free)")
    if cfg.teacher_budget_usd is not None and cfg.teacher_price_in is None:
        raise RunError("--teacher-budget-usd needs the teacher's prices: pass --teacher-price-in and "
                       "--teacher-price-out (USD per million prompt and completion tokens)")
    if cfg.teacher_params is None and not cfg.teacher_url and (cfg.iterations > 0 or cfg.teacher_budget_flops):
        try:  # the embedded teacher: its size is in its config
            cfg.teacher_params = count_parameters(cfg.teacher_model)
        except (OSError, ValueError, KeyError) as e:
            if cfg.teacher_budget_flops is not None:
                raise RunError(f"--teacher-budget-flops: could not count the parameters of the teacher "
                               f"{cfg.teacher_model} ({str(e).splitlines()[0]}); pass --teacher-params N") from None
            print(f"note: could not count the parameters of the teacher {cfg.teacher_model}, so teacher FLOPs are "
                  f"not reported; pass --teacher-params N")
    if cfg.teacher_budget_flops is not None and cfg.teacher_params is None:
        raise RunError("--teacher-budget-flops needs the teacher's parameter count, which an endpoint does not tell: "
                       "pass --teacher-params N (e.g. 7e9)")
    parts = [f"2 x {cfg.teacher_params:.4g} params = {2 * cfg.teacher_params:.4g} FLOPs per token"
             if cfg.teacher_params is not None else "FLOPs not reported (no --teacher-params)"]
    if cfg.teacher_price_in is not None:
        parts.append(f"${cfg.teacher_price_in:g} / ${cfg.teacher_price_out:g} per million prompt / completion tokens")
    budgets = [f"{cfg.teacher_budget_tokens} tokens" if cfg.teacher_budget_tokens is not None else None,
               f"{cfg.teacher_budget_flops:.4g} FLOPs" if cfg.teacher_budget_flops is not None else None,
               f"${cfg.teacher_budget_usd:g}" if cfg.teacher_budget_usd is not None else None]
    budgets = [b for b in budgets if b]
    return "teacher cost: " + "; ".join(parts) + ("; budget " + ", ".join(budgets) if budgets else "")
