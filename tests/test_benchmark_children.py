"""The benchmark's worker processes end with the benchmark: a killed or interrupted benchmark leaves none running.

Each worker runs in a session of its own (so that a timeout kills it with its augmentation processes); without
care such a session outlives the benchmark on Ctrl-C, ``kill`` or ``timeout`` and keeps a GPU busy.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_trainers.py"

# a worker that starts a grandchild (as a worker starts augmentation processes) and records both pids
WORKER = textwrap.dedent("""
    import os, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(120)
""")

DRIVER = textwrap.dedent("""
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("benchmark_trainers", sys.argv[1])
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.exit_on_sigterm()
    bench._run_child([sys.executable, "-c", sys.argv[2], sys.argv[3]], dict(os.environ), sys.argv[4], 300)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_killed_benchmark_takes_its_worker_session_along(tmp_path, signum):
    pids_file = tmp_path / "pids"
    # Ctrl-C as at a terminal: a test run started in the background by a shell without job control inherits SIGINT
    # ignored (POSIX), so the driver would never see it (that ran the worker to its end and exited 0 in such a run)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(SCRIPT), WORKER, str(pids_file),
                               str(tmp_path / "worker.log")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not pids_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker, grandchild = map(int, pids_file.read_text().split())
        assert _alive(worker) and _alive(grandchild)
        assert os.getsid(worker) != os.getsid(driver.pid)  # the worker has its own session, as in the benchmark
        driver.send_signal(signum)
        driver.wait(timeout=60)
        deadline = time.monotonic() + 10
        while (_alive(worker) or _alive(grandchild)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker) and not _alive(grandchild)
        assert driver.returncode != 0
        assert (tmp_path / "worker.log").exists() is False  # interrupted: no log of a finished worker is written
    finally:
        driver.kill()
        for line in pids_file.read_text().split() if pids_file.exists() else []:
            try:
                os.kill(int(line), signal.SIGKILL)
            except ProcessLookupError:
                pass
