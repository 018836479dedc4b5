"""softxent in fork()ed children (DataLoader workers, multiprocessing pools),
spawned children and threads, after the parent used its kernels — with the
threading layer softxent picks and with workqueue (the one without TBB)."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "processes_after_parent_ran.py")


@pytest.mark.parametrize("layer,cold_cache", [(None, True), ("workqueue", False)])
def test_children_and_threads_compute_what_the_parent_computes(layer, cold_cache, tmp_path):
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    if cold_cache:
        env["NUMBA_CACHE_DIR"] = str(tmp_path)
    # bounded: a hang (a pool waiting for a dead worker) fails the test instead of stalling CI
    done = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": ok") == 6, done.stdout


def test_softxent_picks_a_fork_safe_threading_layer():
    code = "import softxent, numba; print(numba.config.THREADING_LAYER)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() in ("tbb", "workqueue"), out.stdout + out.stderr
