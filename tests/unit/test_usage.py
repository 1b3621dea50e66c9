"""lorakit.usage: a child's own peak RSS, CPU and exit code, not inflated by the parent's peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from lorakit.device import peak_rss_bytes
from lorakit.usage import LAUNCHER

# A parent that once held 512 MiB spawns two children: a bare one and one that holds 200 MiB.
PARENT = """
import json, os, subprocess, sys
from pathlib import Path
from lorakit.usage import run_measured
big = bytearray(512 * 2**20); big[::4096] = b"x" * len(big[::4096]); del big
bare = subprocess.Popen([sys.executable, "-c", "pass"]); _, _, ru = os.wait4(bare.pid, 0)
out = Path(sys.argv[1])
_, small = run_measured([sys.executable, "-c", "pass"], out / "small.json")
code, held = run_measured([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'y' * len(b[::4096]); "
                          "import sys; sys.exit(3)"], out / "held.json")
print(json.dumps({"wait4_mb": ru.ru_maxrss / 1024, "small_mb": small.peak_rss_mb, "held_mb": held.peak_rss_mb,
                  "code": code, "cpu_s": held.cpu_s}))
"""


def test_children_report_their_own_peak_not_the_parents(tmp_path):
    r = json.loads(subprocess.run([sys.executable, "-c", PARENT, str(tmp_path)], capture_output=True, text=True,
                                  check=True).stdout)
    # r["wait4_mb"], the kernel's ru_maxrss of a plain subprocess, is the parent's 512+ MiB on Linux with
    # vfork; not asserted: it is the kernel's behaviour, which the launcher exists to avoid
    assert r["small_mb"] < 100
    assert 200 <= r["held_mb"] < 300
    assert r["code"] == 3 and r["cpu_s"] > 0


def test_sigterm_reaches_the_command(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "u.json"), sys.executable, "-c",
                             f"import os, time; open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); "
                             "time.sleep(60)"])
    for _ in range(200):
        if (tmp_path / "pid").is_file() and (tmp_path / "pid").read_text():
            break
        time.sleep(0.05)
    child = int((tmp_path / "pid").read_text())
    proc.terminate()
    assert proc.wait(timeout=10) == 128 + 15
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "zombie" in open(f"/proc/{child}/status").read()


def test_peak_rss_bytes_is_this_process_high_water_mark():
    before = peak_rss_bytes()
    rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    block = bytearray(before - rss + 128 * 2**20)  # touched: resident memory goes 128 MiB past the old peak
    block[::4096] = b"z" * len(block[::4096])
    assert peak_rss_bytes() >= before + 120 * 2**20


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """write_atomic's temporary file is mkstemp's 0600; the written file has 0666 less the umask, as open()."""
    import os

    from lorakit.fileio import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
