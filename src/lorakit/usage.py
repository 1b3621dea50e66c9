"""What a child process alone cost: wall seconds, CPU seconds and peak resident memory.

``os.wait4`` on a child started by ``subprocess`` over-reports its peak: Linux carries ``ru_maxrss`` across
exec from the process that forked it, and with vfork (what ``subprocess`` uses) that is the parent's own
high-water mark. Measured: ``python -c pass`` reports 2 GiB when spawned by a process that once held
2 GiB. So the command runs under ``LAUNCHER``, a bare Python that forks it and reports ``wait4`` of that
grandchild, whose inherited peak is the launcher's ~10 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ChildUsage", "measured_popen", "read_usage", "run_measured"]

# argv: REPORT COMMAND...; exits with the command's status, SIGTERM/SIGINT passed on to it
LAUNCHER = """
import json, os, signal, sys, time
report, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
_, status, ru = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"wall_s": time.perf_counter() - start, "cpu_s": ru.ru_utime + ru.ru_stime,
               "peak_rss_mb": ru.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)}, f)  # B / KiB
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class ChildUsage:
    """What one child process cost: wall seconds, CPU seconds (user + system) and peak resident memory."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float


def measured_popen(cmd: list[str], report: Path, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` under the launcher; once it has ended, ``read_usage(report)``."""
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(report), *cmd], **kwargs)


def read_usage(report: Path) -> ChildUsage:
    """The usage the launcher wrote for its command (after the process has ended)."""
    return ChildUsage(**json.loads(Path(report).read_text()))


def run_measured(cmd: list[str], report: Path, **kwargs: Any) -> tuple[int, ChildUsage]:
    """Run ``cmd`` to completion under the launcher: (exit code, its usage)."""
    proc = measured_popen(cmd, report, **kwargs)
    code = proc.wait()
    return code, read_usage(report)


