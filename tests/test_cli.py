"""The CLI's process handling (its HTTP commands are exercised against the service in test_graph.py)."""

from __future__ import annotations

import signal
import subprocess
import sys

from lightray.cli import spawn_interruptible

# Prints whether Python installed its Ctrl-C handler (it does not when SIGINT is ignored at start-up).
REPORT_SIGINT = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"


def test_serve_child_takes_sigint_even_when_started_in_the_background():
    """`lightray serve` stops `serve run` by forwarding SIGINT. Started as a background job, this process (and
    so a plain child) has SIGINT ignored: the child must be rid of that, or the forwarded signal does nothing."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's `cmd &` starts a job
    try:
        plain = subprocess.run([sys.executable, "-c", REPORT_SIGINT], capture_output=True, text=True, timeout=60)
        child = spawn_interruptible([sys.executable, "-c", REPORT_SIGINT], stdout=subprocess.PIPE, text=True)
        out, _ = child.communicate(timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert plain.stdout.strip() == "False"  # the inherited ignore is real ...
    assert out.strip() == "True"  # ... and the serve child is rid of it


def test_interrupted_child_stops():
    """SIGINT to a child started with SIG_IGN inherited ends it with KeyboardInterrupt (what `serve run` needs)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = spawn_interruptible(
            [sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "up"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
