"""Before a large CPU kernel softxent lets PyTorch's idle (spinning) OpenMP workers go
(softxent.torch.openmp_threads); PyTorch starts them again for its next parallel op."""

import os
import subprocess
import sys

import pytest
import torch

from softxent.torch import openmp_threads

_CHECK = r"""
import os, sys, time, torch
import softxent.torch as sxt
from softxent.torch import openmp_threads

threads = lambda: len(os.listdir("/proc/self/task"))

def threads_once_down_to(at_most, seconds=10.0):
    # an exiting worker leaves /proc/self/task a moment after OpenMP lets it go
    # (on a busy machine, after pthread_join has returned): wait for it, within limits
    deadline = time.monotonic() + seconds
    count = threads()
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.001)
        count = threads()
    return count

torch.set_num_threads(2)
logits = torch.randn(2048, 1000, requires_grad=True)
target = torch.randint(0, 1000, (2048,))
sxt.cross_entropy(logits, target).backward()  # Numba's threads are up from here on
logits.grad = None
x = torch.randn(1 << 22)
y = torch.empty_like(x)
y.copy_(x)  # PyTorch's OpenMP team: one worker besides this thread
with_workers = threads()
released = openmp_threads.release_idle_threads(1 << 22)
without = threads_once_down_to(with_workers - 1)
y.add_(x)  # PyTorch's next parallel op starts its workers again
again = threads()
# a large softxent call releases them too, and its results do not depend on it
y.copy_(x)
loss = sxt.cross_entropy(logits, target)
after_call = threads_once_down_to(without)
loss.backward()
ref = logits.detach().clone().requires_grad_()
torch.nn.functional.cross_entropy(ref, target).backward()
torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(ref, target), rtol=1e-6, atol=1e-6)
torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-8)
torch.testing.assert_close(y, x)
print(released, with_workers, without, again, after_call, torch.get_num_threads())
"""


def _gnu_openmp() -> bool:
    return openmp_threads._pause_all() is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_idle_workers_exit_and_come_back_for_pytorchs_next_op():
    env = {k: v for k, v in os.environ.items() if k != openmp_threads.DISABLE}
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    released, with_workers, without, again, after_call, num_threads = done.stdout.split()
    assert num_threads == "2"
    if not _gnu_openmp():  # another parallel backend: nothing to release, nothing touched
        assert released == "False"
        return
    assert released == "True"
    assert int(without) == int(with_workers) - 1 and int(again) == int(with_workers)
    assert int(after_call) == int(without)  # softxent's call let them go as well


def test_small_kernels_one_thread_and_the_opt_out_leave_the_threads_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(openmp_threads, "_pause_all", lambda: lambda kind: calls.append(kind) or 0)
    assert not openmp_threads.release_idle_threads(openmp_threads.MIN_ELEMENTS - 1)
    monkeypatch.setenv(openmp_threads.DISABLE, "1")
    assert not openmp_threads.release_idle_threads(openmp_threads.MIN_ELEMENTS)
    monkeypatch.delenv(openmp_threads.DISABLE)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not openmp_threads.release_idle_threads(openmp_threads.MIN_ELEMENTS)
    finally:
        torch.set_num_threads(threads)
    assert calls == []
    if threads > 1:
        assert openmp_threads.release_idle_threads(openmp_threads.MIN_ELEMENTS)
        assert calls == [1]  # omp_pause_soft


def test_the_runtime_is_found_only_for_an_openmp_build_of_pytorch():
    info = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" not in info:
        assert openmp_threads._pause_all() is None
    else:  # PyTorch's wheels for Linux link GNU OpenMP; this machine's build does
        assert sys.platform != "linux" or _gnu_openmp()
