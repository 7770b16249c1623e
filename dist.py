"""dist.py: the few torch.distributed calls llm2llm needs to run under torchrun, as plain functions.

    torchrun --nproc-per-node 8 llm2llm.py --task gsm8k ...     # 8 processes, one per GPU
    python llm2llm.py --task gsm8k ...                           # no launcher: one process, nothing here does anything

How the loop uses it: rank 0 alone touches the run directory and the teacher; the other ranks get what they need
from it with `from_rank0` (a function that runs on rank 0, whose result reaches every rank). Training all-reduces the
LoRA gradients of each step with `all_reduce_sum`; evaluation decodes a share of the rows on every rank and brings
the predictions back to rank 0 with `gather_to_rank0`. Without a launcher (WORLD_SIZE unset or 1) every function
returns at once: one process runs exactly the code it ran before.

A rank that dies or hangs must not leave the others waiting forever. Every collective has a timeout
(--dist-timeout); a collective that fails or times out raises RankLost, whose message says what happened and that
rerunning the command resumes the run. Rank 0's own work (talking to the teacher, which may take far longer than
any timeout) is covered by a heartbeat: while it works, rank 0 tells the waiting ranks it is alive every few
seconds, so they wait as long as it lives and stop within the timeout once it does not.

The student is loaded here too (whole, or with --fsdp sharded over the ranks), and a saved adapter is read by rank 0
and sent to the others (attach_adapter), so only rank 0 ever reads the run directory.
"""
import datetime
import os
import threading

import torch
import torch.distributed as torch_dist

from generate import ModelLoadError, load_model
from lora import add_lora, load_adapter, lora_modules


class RankLost(RuntimeError):
    """Another rank died, hung, or stopped on an error; this rank cannot go on alone."""


class Rank0Failed(RankLost):
    """Rank 0 stopped on an error it has already reported; the other ranks exit quietly."""


_state = {"timeout_s": None, "objects": None}


# -----------------------------------------------------------------------------
# Set-up and tear-down

def launched():
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device, timeout_s):
    """Join the process group when launched with more than one process; return this rank's device (cuda:LOCAL_RANK
    on CUDA, else `device`). Backend NCCL on CUDA, gloo otherwise."""
    if not launched() or torch_dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        # torchrun gives each process 1 thread; on CPU the ranks of a node share its cores instead
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    timeout = datetime.timedelta(seconds=timeout_s)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                  device_id=device if device.type == "cuda" else None)
    # Python objects (rows, predictions, heartbeats) travel over gloo on the CPU whatever the device, so they never
    # occupy a GPU stream; tensors (gradients) use the default group (NCCL on CUDA).
    _state["objects"] = torch_dist.new_group(backend="gloo", timeout=timeout)
    _state["timeout_s"] = timeout_s
    return device


def shutdown():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _state["objects"] = None


def active():
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank():
    return torch_dist.get_rank() if active() else 0


def world_size():
    return torch_dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def describe():
    """One line for the start-up print."""
    if not active():
        return "1 process"
    return (f"{world_size()} processes ({torch_dist.get_backend()}), torch threads "
            f"{torch.get_num_threads()}, collective timeout {_state['timeout_s']:g} s")


# -----------------------------------------------------------------------------
# Collectives. Each one translates a failure (a peer gone, or silent past the timeout) into RankLost.

def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RankLost:
        raise
    except (RuntimeError, ValueError) as e:  # DistBackendError and gloo's timeouts are RuntimeErrors
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankLost(f"rank {rank()}: another process of this run stopped or did not answer within "
                       f"--dist-timeout {_state['timeout_s']:g} s ({first_line[:300]}). The run directory keeps "
                       f"everything finished so far: rerun the same command to resume.") from e


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    _collective(torch_dist.broadcast_object_list, box, src=0, group=_state["objects"])
    return box[0]


def gather_to_rank0(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0; None on the other ranks."""
    if not active():
        return [obj]
    out = [None] * world_size() if is_main() else None
    _collective(torch_dist.gather_object, obj, out, dst=0, group=_state["objects"])
    return out


def all_reduce_sum(tensor):
    """Sum `tensor` over all ranks, in place (default group: NCCL on CUDA)."""
    if active():
        _collective(torch_dist.all_reduce, tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_tensors(tensors):
    """Overwrite each tensor with rank 0's (default group: the tensors stay on their device)."""
    if active():
        for t in tensors:
            _collective(torch_dist.broadcast, t.data, src=0)


def from_rank0(fn):
    """Run fn() on rank 0 only and hand its result to every rank. If fn raises, rank 0 re-raises it (and reports
    it) while the other ranks raise Rank0Failed. fn must not use collectives itself.

    A heartbeat covers long work: every `timeout / 4` seconds (at most 30 s) rank 0 broadcasts "still working"
    from a helper thread, and the other ranks wait for the next message, each wait bounded by the timeout."""
    if not active():
        return fn()
    if not is_main():
        while True:
            message = broadcast_object(None)
            if message[0] == "ok":
                return message[1]
            if message[0] == "failed":
                raise Rank0Failed(message[1])
    stop, lost = threading.Event(), []

    def heartbeat():
        while not stop.wait(min(30.0, _state["timeout_s"] / 4)):
            try:
                broadcast_object(("working",))
            except RankLost as e:
                lost.append(e)
                return

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        result = fn()
    except BaseException as e:
        stop.set()
        beat.join()
        if not lost:
            try:
                broadcast_object(("failed", f"rank 0 stopped: {type(e).__name__}: {e}"))
            except RankLost:
                pass  # the others are gone already; report rank 0's own error
        raise
    stop.set()
    beat.join()
    if lost:
        raise lost[0]
    broadcast_object(("ok", result))
    return result


# -----------------------------------------------------------------------------
# Sharding rows: rank r takes rows r, r + N, r + 2N, ... Rows are often sorted by length before this, so each
# rank gets the same mix of short and long rows.

def my_share(items):
    return items[rank()::world_size()]


def interleave(shares):
    """Put the per-rank lists that `my_share` made back into input order."""
    out = [None] * sum(len(s) for s in shares)
    for r, part in enumerate(shares):
        out[r::len(shares)] = part
    return out


# -----------------------------------------------------------------------------
# The student on every rank: loaded whole, or sharded with --fsdp; adapters read by rank 0 and sent to the others

def load_student(name, device, precision, fsdp):
    """The student on this rank's device. With fsdp (under torchrun) each decoder layer's frozen weights are sharded
    over the ranks (FSDP2); embeddings, final norm and lm_head stay whole on every rank, so the training loss may
    call lm_head directly. Adapters added later stay whole too: FSDP manages only the parameters it was given."""
    if not (fsdp and active()):
        return load_model(name, device, precision, "student")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # every rank first loads the whole model into CPU memory, in the precision it computes in (bf16 on CUDA)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model, tokenizer = load_model(name, torch.device("cpu"), precision, "student", dtype=low)
    body = getattr(model, "model", None)
    if not isinstance(getattr(body, "layers", None), torch.nn.ModuleList):
        raise ModelLoadError(f"--fsdp shards Llama-family students (model.model.layers); {name} is a "
                             f"{model.config.model_type} model: run it without --fsdp")
    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in body.layers:
        fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=low))  # moves shards to device
    for child_name, child in body.named_children():
        if child_name != "layers":
            child.to(device)
    model.lm_head.to(device)
    return model, tokenizer


def attach_adapter(model, adapter_dir, cfg):
    """load_adapter on rank 0; the other ranks add an adapter of the same shape and receive its weights, so they
    never read the run directory."""
    if not active():
        return load_adapter(model, adapter_dir)
    if not lora_modules(model):
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, verbose=False)
    from_rank0(lambda: load_adapter(model, adapter_dir) and None)
    broadcast_tensors([p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)])
