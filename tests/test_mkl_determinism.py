"""No dynamic threads in training (issue 16, item 9): with OpenMP's dynamic adjustment on
(OMP_DYNAMIC=true), libgomp sizes each parallel team from the load average and the affinity mask,
so a busy machine runs torch's reductions and MKL's BLAS on fewer threads than set, which split
their sums differently. Training switches OpenMP's and MKL's dynamic threads off and gives the
caller's settings back."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import small_run

import babyllama.train as T

needs_switches = pytest.mark.skipif(set(T.dynamic_threads()) != {"omp", "mkl"},
                                    reason="this torch links no MKL or no OpenMP")


@pytest.fixture
def dynamic_on():
    """The caller has switched both dynamic modes on; everything is put back afterwards."""
    threads = torch.get_num_threads()
    T.set_dynamic_threads({"omp": 1, "mkl": 1})
    yield
    torch.set_num_threads(threads)
    T.set_dynamic_threads({"omp": 0, "mkl": 0})


@needs_switches
def test_training_runs_without_dynamic_threads(data_dir, tmp_path, monkeypatch, dynamic_on):
    seen = []

    def get_lr(it, cfg):   # called once per step, inside the training context
        seen.append(T.dynamic_threads())
        return lr(it, cfg)

    lr = T.get_lr
    monkeypatch.setattr(T, "get_lr", get_lr)
    T.train(small_run(data_dir, tmp_path, max_iters=2, batch_size=2, eval_iters=1))
    assert seen == [{"omp": 0, "mkl": 0}] * 2
    assert T.dynamic_threads() == {"omp": 1, "mkl": 1}   # the caller's, given back


@needs_switches
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_sum_inside_training_keeps_its_thread_count(dynamic_on):
    """Provoked on demand: with one CPU in this thread's affinity mask, dynamic OpenMP gives a
    2-thread torch a 1-thread team (as a load average >= 1 does on 2 cores), and a long sum,
    split by threads, changes in its last bits. Inside training's context it must not."""
    x = torch.randn(4_000_003, generator=torch.Generator().manual_seed(0))
    T.set_dynamic_threads({"omp": 0, "mkl": 0})
    torch.set_num_threads(1)
    one = x.sum()
    torch.set_num_threads(2)
    two = x.sum()
    assert not torch.equal(one, two)   # else this test could not tell the thread counts apart

    def sum_on_one_cpu():
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})
        try:
            return x.sum()
        finally:
            os.sched_setaffinity(0, cpus)

    T.set_dynamic_threads({"omp": 1, "mkl": 1})
    torch.set_num_threads(2)
    assert torch.equal(sum_on_one_cpu(), one)   # the hazard: asked for 2 threads, ran on 1
    with T._own_globals("cpu"):
        torch.set_num_threads(2)                # as _train does
        assert torch.equal(sum_on_one_cpu(), two)
