"""The loop under torchrun: 2 processes on the CPU (gloo) against 1 process, a rank that dies, and the rerun.

    python -m pytest -q tests/test_distributed.py

The reference is the same command in one process. Two processes must give the same greedy predictions and
metrics, and final LoRA weights equal within a tolerance (see test_two_processes_match_one_process for why they
are not bit-identical). A rank that hangs must make the other stop within --dist-timeout with a message that says
to rerun, and the rerun (here with --fsdp, which shards the frozen base with FSDP2 on gloo) must finish the run
with the same results.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import dist
import llm2llm
import train
from conftest import ROOT
from test_llm2llm import NEGATIVE, POSITIVE, ScriptedTeacher, read_jsonl, without_timings

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "sst2"
    folder.mkdir()
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [{"text": t, "label": "negative"} for t in NEGATIVE]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::2] + rows[1::2]))
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in [
        ("a warm and wise film", "positive"), ("a chore to sit through", "negative"),
        ("sharp , funny and true", "positive"), ("lifeless and forgettable", "negative"),
        ("an instant classic", "positive")]))
    return folder.parent


@pytest.fixture(scope="module")
def teacher():
    t = ScriptedTeacher()
    yield t
    t.release.set()
    t.server.shutdown()


def flags(student, data_dir, out, teacher_url, *extra):
    # no LoRA dropout: one process and two draw different dropout masks, which is not what this test compares
    return ["--task", "sst2", "--data-dir", str(data_dir), "--student", str(student), "--teacher-url", teacher_url,
            "--teacher-model", "scripted", "--seed-size", "7", "--iterations", "1", "--epochs", "2",
            "--batch-size", "4", "--eval-batch-size", "2", "--max-new-tokens", "4", "--lora-dropout", "0",
            "--teacher-workers", "1", "--out", str(out), *extra]


def torchrun(argv, timeout=240):
    out = subprocess.run([*TORCHRUN, str(ROOT / "llm2llm.py"), *argv], capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, data_dir, teacher, tmp_path_factory):
    """The same run in one process and in two."""
    base = tmp_path_factory.mktemp("runs")
    assert llm2llm.main(flags(tiny_llama_dir, data_dir, base / "one", teacher.url)) == 0
    two = torchrun(flags(tiny_llama_dir, data_dir, base / "two", teacher.url))
    return base / "one", base / "two", two


def adapter(path):
    return load_file(path / "adapter" / "adapter_model.safetensors")


def test_two_processes_match_one_process(runs):
    one, two, launch = runs
    assert "distributed: 2 processes (gloo)" in launch.stdout
    assert launch.stdout.count("config:") == 1  # only rank 0 prints
    metrics_one, metrics_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["iteration"] for m in metrics_two] == [0, 1]
    assert metrics_two[0]["n_wrong"] > 0 and metrics_two[1]["train_size"] > metrics_two[0]["train_size"]
    # final_loss is a float summed in another order (below); everything else is equal
    assert [dict(m, final_loss=None) for m in without_timings(metrics_two)] == \
        [dict(m, final_loss=None) for m in without_timings(metrics_one)]
    for i in (0, 1):
        step_one, step_two = one / f"iter_{i:02d}", two / f"iter_{i:02d}"
        for name in ("train.jsonl", "seed_predictions.jsonl", "test_predictions.jsonl", "augmented.jsonl"):
            assert read_jsonl(step_two / name) == read_jsonl(step_one / name), name  # greedy: identical
        # Not bit-identical: with two processes each rank sums the loss gradients of its own rows, and the all-reduce
        # adds the two partial sums; one process accumulates the same terms in another order. Float addition is not
        # associative, so the weights differ by rounding (~1e-7 relative per step), which AdamW's normalised
        # update can amplify on near-zero gradients. 1e-4 is far below any change training makes (checked below).
        a, b = adapter(step_one), adapter(step_two)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
        trained = sum((a[k] != 0).sum().item() for k in a if "lora_B" in k)  # B starts at zero
        assert trained > 0
        assert abs(metrics_two[i]["final_loss"] - metrics_one[i]["final_loss"]) < 1e-5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_hung_rank_stops_the_other_within_the_timeout_and_the_rerun_resumes(tiny_llama_dir, data_dir, teacher,
                                                                              runs, tmp_path):
    # Two ranks started by hand, as torchrun would on two machines: here torchrun itself would notice a dead
    # worker and stop the others, on several nodes it cannot. Rank 0 is frozen (SIGSTOP) while it waits for the
    # teacher, so its heartbeat stops; rank 1 must give up after --dist-timeout with a clear message.
    out, timeout = tmp_path / "run", 6
    argv = flags(tiny_llama_dir, data_dir, out, teacher.url, "--dist-timeout", str(timeout))
    env = dict(os.environ, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    teacher.requests.clear()
    teacher.holding.clear()
    teacher.release.clear()
    teacher.hold_request = 1
    procs = [subprocess.Popen([sys.executable, str(ROOT / "llm2llm.py"), *argv],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        assert teacher.holding.wait(timeout=180), "rank 0 never reached the teacher"
        procs[0].send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        _, err = procs[1].communicate(timeout=timeout + 30)
        waited = time.time() - stopped_at
    finally:
        procs[0].send_signal(signal.SIGKILL)
        procs[0].communicate()
        teacher.hold_request = None
        teacher.release.set()
    assert procs[1].returncode == 2, err[-3000:]
    assert "another process of this run stopped or did not answer within --dist-timeout 6 s" in err, err[-3000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err, err[-3000:]
    assert timeout <= waited < timeout + 30
    assert not (out / "metrics.jsonl").exists()  # it really stopped in iteration 0
    trained = (out / "iter_00" / "adapter" / "adapter_model.safetensors").read_bytes()

    # The rerun (torchrun, 2 processes) resumes: iteration 0 is not trained again, and the run ends as the
    # reference. It runs with --fsdp (which a resume may change): iteration 1 then trains and decodes with the
    # decoder layers sharded over the two ranks, which must not change what is computed beyond rounding.
    launch = torchrun(argv + ["--fsdp"])
    assert "base model sharded (FSDP2)" in launch.stdout
    assert (out / "iter_00" / "adapter" / "adapter_model.safetensors").read_bytes() == trained
    reference = runs[1]
    metrics, expected = read_jsonl(out / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [dict(m, final_loss=None) for m in without_timings(metrics)] == \
        [dict(m, final_loss=None) for m in without_timings(expected)]
    assert metrics[0]["final_loss"] == expected[0]["final_loss"]  # iteration 0 came from the first attempt
    for name in ("seed_predictions.jsonl", "test_predictions.jsonl", "augmented.jsonl", "train.jsonl"):
        assert read_jsonl(out / "iter_01" / name) == read_jsonl(reference / "iter_01" / name)
    a, b = adapter(reference / "iter_01"), adapter(out / "iter_01")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


# -----------------------------------------------------------------------------
# train() on two ranks: a kill and a resume from rank 0's checkpoint (with every rank's RNG state, as LoRA dropout
# is on) must end exactly where an uninterrupted two-rank training ends.

def _train_worker(rank, port, model_dir, pairs, checkpoint, result):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import lora
    from conftest import load_pretrained
    dist.init(torch.device("cpu"), 60)
    kwargs = dict(epochs=3, batch_size=4, lr=5e-3, seed=3, progress=False, checkpoint_every_s=0)

    def student(seed):
        model, tokenizer = load_pretrained(model_dir)
        torch.manual_seed(seed)
        return lora.add_lora(model, r=4, alpha=8, dropout=0.3, verbose=False), tokenizer

    def weights(model):
        return {f"{n}.{p}": getattr(m, p).weight.detach().clone() for n, m in lora.lora_modules(model)
                for p in ("lora_A", "lora_B")}

    model, tokenizer = student(0)
    reference = train.train(model, tokenizer, pairs, **kwargs)
    expected = weights(model)

    real_lr_at = train.lr_at
    train.lr_at = lambda step, *a: (_ for _ in ()).throw(KeyboardInterrupt) if step == 4 else real_lr_at(step, *a)
    try:
        train.train(student(0)[0], tokenizer, pairs, checkpoint_path=checkpoint, **kwargs)
    except KeyboardInterrupt:
        pass
    train.lr_at = real_lr_at
    model = student(99)[0]  # another init on purpose: the checkpoint must overwrite it on every rank
    resumed = train.train(model, tokenizer, pairs, checkpoint_path=checkpoint, **kwargs)
    got = weights(model)
    if rank == 0:
        torch.save({"resumed_at": resumed["resumed_at_step"], "same_losses": resumed["loss_history"] ==
                    reference["loss_history"], "same_weights": all(torch.equal(got[k], expected[k]) for k in got),
                    "steps": reference["steps"]}, result)
    dist.shutdown()


def test_two_rank_training_resumes_from_a_kill_exactly(tiny_llama_dir, tmp_path):
    pairs = [(f"Review: {t}", label) for t, label in [(t, "positive") for t in POSITIVE[:5]] +
             [(t, "negative") for t in NEGATIVE[:5]]]
    result = tmp_path / "result.pt"
    torch.multiprocessing.spawn(_train_worker, args=(free_port(), str(tiny_llama_dir), pairs,
                                                     str(tmp_path / "train_state.pt"), str(result)), nprocs=2)
    outcome = torch.load(result)
    assert outcome["steps"] == 9 and outcome["resumed_at"] == 4
    assert outcome["same_losses"] and outcome["same_weights"]


# -----------------------------------------------------------------------------
# The pieces, without processes

def test_shares_cover_every_row_once_and_interleave_back_in_order(monkeypatch):
    rows = list(range(11))
    for world in (1, 2, 3, 4):
        monkeypatch.setattr(dist, "world_size", lambda: world)
        shares = []
        for r in range(world):
            monkeypatch.setattr(dist, "rank", lambda: r)
            shares.append(dist.my_share(rows))
        assert sorted(sum(shares, [])) == rows
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert dist.interleave(shares) == rows


def test_fsdp_lockstep_gives_every_rank_as_many_micro_batches(monkeypatch):
    # under FSDP a rank with fewer micro-batches than another would wait forever for a layer's all-gather
    lengths = [5, 40, 41, 42, 43, 90, 7]
    step = [0, 1, 2, 3, 4, 5, 6]
    for world in (2, 3, 8):
        monkeypatch.setattr(dist, "world_size", lambda: world)
        counts = []
        for r in range(world):
            monkeypatch.setattr(dist, "rank", lambda: r)
            mine = dist.my_share(sorted(step, key=lambda i: lengths[i]))
            micro = train.split_micro_batches(mine, lengths, 90)
            padded, weights = train._lockstep(step, mine, micro, lengths, lengths, 90)
            assert padded[:len(micro)] == micro and weights[:len(micro)] == [1.0] * len(micro)
            assert all(w == 0.0 for w in weights[len(micro):]) and all(len(m) == 1 for m in padded[len(micro):])
            counts.append(len(padded))
        assert len(set(counts)) == 1 and counts[0] >= 1


@pytest.mark.parametrize("mode", ["heldout:2", "early:0.5"])
def test_each_mistakes_mode_under_two_processes_matches_one_process(mode, tiny_llama_dir, data_dir, teacher,
                                                                     tmp_path):
    """--mistakes heldout trains its fold adapters data-parallel and gathers their evaluations; early evaluates the
    seed set inside the training loop, on every rank at the same step."""
    argv = lambda out: flags(tiny_llama_dir, data_dir, out, teacher.url, "--mistakes", mode,  # noqa: E731
                             "--lr", "5e-3", "--train-steps", "6")
    assert llm2llm.main(argv(tmp_path / "one")) == 0
    torchrun(argv(tmp_path / "two"))
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert one[0]["mistakes"] == mode and one[0]["n_wrong"] > 0
    timings = {"mistakes_seconds", "final_loss"}
    assert [{k: v for k, v in m.items() if k not in timings} for m in without_timings(two)] == \
        [{k: v for k, v in m.items() if k not in timings} for m in without_timings(one)]
    names = ["mistakes.jsonl", "augmented.jsonl"] + (
        [f"folds/fold_{j}/predictions.jsonl" for j in (0, 1)] if mode.startswith("heldout") else
        ["seed_predictions_early.jsonl"])
    for name in names:
        assert read_jsonl(tmp_path / "two" / "iter_00" / name) == read_jsonl(tmp_path / "one" / "iter_00" / name), name
