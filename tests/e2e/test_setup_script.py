"""scripts/setup.sh installs into the active interpreter (a virtual environment) and says what it is doing,
a line per stage (issue 8, item 7). pip runs for real in a fresh venv, as a dry run: it resolves everything
from the packages already here (no index, no build isolation) and installs nothing."""

from __future__ import annotations

import os
import platform
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_setup_uses_the_active_virtual_environment_and_reports_each_stage(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    # --system-site-packages sees the base interpreter's packages only; when the suite itself runs in a venv
    # (as README asks), that venv's packages are what pip must resolve from: a .pth file adds them
    (site_dir,) = venv.glob("lib/python*/site-packages")
    (site_dir / "suite-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",  # `. venv/bin/activate`
               PIP_DRY_RUN="1", PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")  # pip reads "0" as: no isolation
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (f"setup: installing into {venv} (a virtual environment) with Python "
                        f"{platform.python_version()}")
    stages = [line for line in lines if line.startswith("setup: [")]
    assert [line.split("] ")[0] for line in stages] == [f"setup: [{i}/4" for i in range(1, 5)]
    assert "setup: [3/4] lorakit (editable) with its test extras" in stages
    assert sum(line.startswith("setup: done in ") for line in lines) == 4
    assert "Would install lorakit-0.1.0" in lines  # the venv's pip, about to install into the venv
    assert not [line for line in lines if line.startswith("Requirement already satisfied")]
