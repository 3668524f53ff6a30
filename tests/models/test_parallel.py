"""Parallel training runs (models/parallel.py): Ctrl-C kills every worker; each worker shows per-step bars."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A parent like `python -m models.train all --jobs 2`: two long "training runs" in worker processes.
PARENT = """
import importlib.util, os, sys, time
# models/parallel.py alone: `import models` would import torch (seconds), which this test does not need.
spec = importlib.util.spec_from_file_location("parallel", sys.argv[4])
parallel = importlib.util.module_from_spec(spec)
sys.modules["parallel"] = parallel
spec.loader.exec_module(parallel)

def run(name, steps, pause):
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()}\\n")
    for _ in parallel.bar(range(steps), desc=name):
        time.sleep(pause)
    return name

if __name__ == "__main__":
    calls = [(f"job{i}", int(sys.argv[2]), float(sys.argv[3])) for i in range(3)]
    done = sorted(parallel.run_parallel(run, calls, jobs=2, desc="runs"))
    print("done", done, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, the test's child, reaps it or has exited).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _start(tmp_path: Path, steps: int, pause: float) -> tuple[subprocess.Popen, Path]:
    script, pids = tmp_path / "parent.py", tmp_path / "pids"
    script.write_text(PARENT)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(pids),
            str(steps),
            str(pause),
            str(ROOT / "models" / "parallel.py"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    return proc, pids


def _worker_pids(pids: Path, n: int) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if pids.exists() and len(found := pids.read_text().split()) >= n:
            return [int(p) for p in found]
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


def test_ctrl_c_kills_every_worker(tmp_path):
    proc, pids = _start(tmp_path, steps=10_000, pause=0.01)  # ~100 s per run if nothing stopped it
    workers = _worker_pids(pids, 2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
    _, err = proc.communicate(timeout=15)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if _alive(p)], "workers left running after Ctrl-C"


def test_sigterm_to_the_parent_alone_kills_every_worker(tmp_path):
    proc, pids = _start(tmp_path, steps=10_000, pause=0.01)
    workers = _worker_pids(pids, 2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=15)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.returncode != 0 and not [p for p in workers if _alive(p)]


def test_parallel_workers_show_per_step_progress(tmp_path):
    proc, _ = _start(tmp_path, steps=20, pause=0.03)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "done ['job0', 'job1', 'job2']" in out
    for name in ("job0", "job1", "job2"):
        assert f"{name}:" in err and "/20" in err, err[-2000:]
    # Intermediate steps are drawn, not only the end.
    assert any(f"| {k}/20" in err for k in range(1, 20)), err[-2000:]
