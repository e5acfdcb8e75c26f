"""Starting and stopping the servers under test, shared by zero_loss.py and bench.py."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

LISTENING = re.compile(r"listening addr=(\S+)")
START_TIMEOUT_SECONDS = 30
EXIT_TIMEOUT_SECONDS = 120


def start(command, log_path, env=None, cpus=None):
    """Starts `command`, which logs `listening addr=HOST:PORT`; returns the process and address.

    Output goes to `log_path`. With `cpus`, a set of CPU numbers, the process runs only on those.
    Raises RuntimeError, after killing the process, when it exits or logs no address within
    START_TIMEOUT_SECONDS.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   env=env, preexec_fn=pin_to(cpus))
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        match = LISTENING.search(Path(log_path).read_text(errors="replace"))
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait()
    raise RuntimeError(f"{command[0]} did not start (exit status {process.returncode}):\n"
                       f"{Path(log_path).read_text(errors='replace')}")


def pin_to(cpus):
    """Returns a `preexec_fn` that keeps the new process on `cpus`, or None when `cpus` is None."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def stop(process):
    """Sends SIGINT and waits for the exit; returns the exit status and the seconds it took.

    A process that does not exit within EXIT_TIMEOUT_SECONDS is killed, and the status is then
    a message saying so.
    """
    if process.poll() is not None:
        return process.returncode, 0.0
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        status = process.wait(timeout=EXIT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        status = f"killed: no exit within {EXIT_TIMEOUT_SECONDS} s of SIGINT"
    return status, time.monotonic() - started
