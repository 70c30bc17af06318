"""Chapter 03: exact resume, DDP against one process, and what happens when things go wrong."""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import checkpoint_weights as _weights
from helpers import logged_losses as _losses
from helpers import small_run as _cfg

from babyllama import train as T
from babyllama.train import TrainConfig, TrainingError, read_log, train


def test_resume_is_exact(data_dir, tmp_path):
    a = train(_cfg(data_dir, tmp_path / "a"))
    train(_cfg(data_dir, tmp_path / "b", max_iters=10))
    b = train(_cfg(data_dir, tmp_path / "b", max_iters=20), resume=True)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 20
    # the tokens count on from the checkpoint: the same column in both logs
    tokens = {run: [r["tokens"] for r in read_log(tmp_path / run / "log.jsonl") if "tokens" in r]
              for run in "ab"}
    c = _cfg(data_dir, tmp_path)
    assert tokens["a"] == tokens["b"]
    assert tokens["a"][-1] == 20 * c.batch_size * c.grad_accum * c.max_seq_len
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    rec = [r for r in read_log(tmp_path / "a" / "log.jsonl") if "mfu" in r][-1]
    assert rec["tokens_per_s"] > 0 and 0 < rec["mfu"] < 1


def test_ddp_two_processes_match_one(data_dir, tmp_path):
    cfg = dict(max_iters=6, lr_decay_iters=6, dropout=0.0, batch_size=8)
    one = train(_cfg(data_dir, tmp_path / "one", **cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "babyllama", "train", "--preset", "stories260K", "--out",
           str(tmp_path / "two"), "--data-dir", str(data_dir), "--max-seq-len", "64",
           "--batch-size", "8", "--max-iters", "6", "--lr-decay-iters", "6", "--warmup-iters",
           "3", "--eval-interval", "0", "--eval-iters", "2", "--log-interval", "1",
           "--no-progress", "--dropout", "0.0", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(la) == len(lb) == 6
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
    wa, wb = _weights(one), _weights(tmp_path / "two" / "ckpt.pt")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_training_ignores_and_restores_the_callers_torch_state(data_dir, tmp_path):
    """The `trained` fixture must not depend on which tests ran before it: a run after the
    caller changed every process-wide torch setting training depends on (and consumed random
    numbers) ends bit for bit where a clean run ends, and the caller's settings survive it."""
    kw = dict(max_iters=2, lr_decay_iters=2, threads=torch.get_num_threads())
    clean = _weights(train(_cfg(data_dir, tmp_path / "clean", **kw)))
    saved = (torch.get_num_threads(), torch.get_default_dtype(),
             torch.get_float32_matmul_precision(), torch.get_rng_state())
    try:
        torch.set_num_threads(1 if saved[0] > 1 else 2)
        torch.set_default_dtype(torch.float64)
        torch.set_float32_matmul_precision("medium")
        assert torch.set_flush_denormal(True)   # x86 and arm64 both support it
        torch.rand(1000)
        rng = torch.get_rng_state()
        with torch.no_grad():
            dirty = _weights(train(_cfg(data_dir, tmp_path / "dirty", **kw)))
            assert not torch.is_grad_enabled()
        assert torch.get_num_threads() == (1 if saved[0] > 1 else 2)
        assert torch.get_default_dtype() == torch.float64
        assert torch.get_float32_matmul_precision() == "medium"
        assert T._flushing_denormals()
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.set_num_threads(saved[0])
        torch.set_default_dtype(saved[1])
        torch.set_float32_matmul_precision(saved[2])
        torch.set_flush_denormal(False)
        torch.set_rng_state(saved[3])
    assert _losses(tmp_path / "clean") == _losses(tmp_path / "dirty")
    assert all(clean[k].dtype == dirty[k].dtype == torch.float32 for k in clean)
    assert all(torch.equal(clean[k], dirty[k]) for k in clean)


def test_gradient_accumulation_matches_a_bigger_batch(data_dir, tmp_path, monkeypatch):
    """8 rows in one step == 4 rows x 2 accumulated micro-steps, on the same 8 windows."""
    rows = np.random.default_rng(0).integers(3, 512, (8, 65))

    def fake_batch(shards, batch_size, seq_len, seed, step):   # micro-step k: rows k*B..
        r = rows[step * batch_size:(step + 1) * batch_size] if seed == 1337 else rows[:batch_size]
        return r[:, :seq_len], r[:, 1:seq_len + 1]

    monkeypatch.setattr(T, "get_batch", fake_batch)
    kw = dict(max_iters=1, lr_decay_iters=1, warmup_iters=0, dropout=0.0, seed=1337)
    big = _weights(train(_cfg(data_dir, tmp_path / "big", batch_size=8, grad_accum=1, **kw)))
    acc = _weights(train(_cfg(data_dir, tmp_path / "acc", batch_size=4, grad_accum=2, **kw)))
    # AdamW's first step moves every weight by about lr * g / (|g| + eps) = 3e-3: a weight whose
    # gradient is near eps feels the last bits of a reduction order (measured up to 9e-6 on an
    # AMD EPYC), while a micro-step dropped or counted twice moves weights by a good part of lr
    assert max((big[k] - acc[k]).abs().max().item() for k in big) < 1e-4
    assert abs(_losses(tmp_path / "big")[0] - _losses(tmp_path / "acc")[0]) < 1e-5


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [T.get_lr(i, cfg) for i in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert lrs[110] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_weight_decay_on_matrices_only():
    from babyllama.model import PRESETS, Transformer

    opt = T.make_optimizer(Transformer(PRESETS["stories260K"]), TrainConfig())
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_tracks_float32(data_dir, tmp_path, dtype):
    """Autocast is really on (the losses differ from fp32's) and the run trains like fp32."""
    kw = dict(max_iters=8, lr_decay_iters=8, dropout=0.0)
    train(_cfg(data_dir, tmp_path / "fp32", **kw))
    train(_cfg(data_dir, tmp_path / dtype, dtype=dtype, **kw))
    ref, low = _losses(tmp_path / "fp32"), _losses(tmp_path / dtype)
    diff = max(abs(a - b) for a, b in zip(ref, low))
    assert len(low) == 8 and 0 < diff < 0.01, diff
    assert low[-1] < low[0] - 0.3


def test_float16_resume_is_exact_with_the_grad_scaler(data_dir, tmp_path):
    kw = dict(dtype="float16", max_iters=8, lr_decay_iters=8)
    a = train(_cfg(data_dir, tmp_path / "a", **kw))
    train(_cfg(data_dir, tmp_path / "b", **{**kw, "max_iters": 4}))
    b = train(_cfg(data_dir, tmp_path / "b", **kw), resume=True)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sa["scaler"] == sb["scaler"] and sa["scaler"]["_growth_tracker"] == 8


def test_grad_scaler_skips_steps_whose_gradients_overflow(data_dir, tmp_path, monkeypatch):
    """With a loss scale of 2^40 every fp16 backward overflows: each step must be skipped
    (weights untouched) and the scale halved, instead of inf reaching the weights."""
    kw = dict(dtype="float16", dropout=0.0)
    init = _weights(train(_cfg(data_dir, tmp_path / "init", max_iters=0, **kw)))
    monkeypatch.setattr(torch.amp, "GradScaler",
                        functools.partial(torch.amp.GradScaler, init_scale=2.0**40))
    state = torch.load(train(_cfg(data_dir, tmp_path / "run", max_iters=3, **kw)),
                       weights_only=True)
    assert state["scaler"]["scale"] == 2.0**37
    assert all(torch.equal(init[k], state["model"][k]) for k in init)
    assert all(math.isfinite(x) for x in _losses(tmp_path / "run"))


def test_bad_dtype_and_device(data_dir, tmp_path):
    with pytest.raises(TrainingError, match="dtype 'float64'.*expected one of"):
        train(_cfg(data_dir, tmp_path, dtype="float64"))
    with pytest.raises(TrainingError, match="device 'gpu' is not usable here"):
        train(_cfg(data_dir, tmp_path, device="gpu"))


def test_nan_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real = T.get_lr
    monkeypatch.setattr(T, "get_lr", lambda it, cfg: 1e30 if it >= 3 else real(it, cfg))
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*last good checkpoint"):
        train(_cfg(data_dir, tmp_path, eval_interval=2, dropout=0.0))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["iter_num"] in (2, 4)   # the last evaluation whose loss was finite
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_with_a_different_config(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path, max_iters=2))
    with pytest.raises(TrainingError, match="different model config"):
        train(_cfg(data_dir, tmp_path, preset="book", max_iters=4), resume=True)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(_cfg(data_dir, tmp_path / "empty"), resume=True)


def test_missing_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="babyllama pretokenize"):
        train(_cfg(tmp_path, tmp_path / "o"))


def test_sigint_saves_and_resume_continues(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "babyllama", "train", "--preset", "stories260K", "--out",
           str(out), "--data-dir", str(data_dir), "--max-seq-len", "64", "--batch-size", "4",
           "--max-iters", "100000", "--eval-interval", "0", "--log-interval", "1",
           "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        log = out / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 130 and "continue with --resume" in stdout
    state = torch.load(out / "ckpt.pt", weights_only=True)
    done = state["iter_num"]
    assert done >= 3
    # resuming needs only the output directory: the rest comes from the checkpoint
    resume = [*cmd[:4], "--out", str(out), "--max-iters", str(done + 2), "--resume"]
    r = subprocess.run([*resume, "--learning-rate", "1e-4", "--batch-size", "4"],
                       capture_output=True, text=True, timeout=300)   # 4 is the checkpoint's
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--learning-rate 0.0001 (checkpoint: 0.003)" in r.stderr, r.stderr[-2000:]
    assert "--batch-size" not in r.stderr
    r = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == done + 2


def test_torch_compile_matches_eager(data_dir, tmp_path):
    """--compile (torch.compile with inductor, ~1 minute to compile on CPU) trains the same."""
    kw = dict(max_iters=3, lr_decay_iters=3, dropout=0.0, log_interval=1)
    train(_cfg(data_dir, tmp_path / "eager", **kw))
    train(_cfg(data_dir, tmp_path / "compiled", compile=True, **kw))
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-3
