"""Packaging: pyproject.toml is the one source of the version, and building the package prints
no warning and ships its type marker, licence and the monitor's page."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import cascowfs
from fusehelpers import REPO, run_cli

# pip's own notices about this machine's index configuration, not about the package
PIP_NOTICE = re.compile(r"^WARNING: Location '.*' is ignored")
WARNING = re.compile(r"warning\b", re.IGNORECASE)


def test_version_is_pyproject_version_everywhere():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert metadata.version("cascowfs") == version
    assert cascowfs.__version__ == version
    assert run_cli("--version").stdout == f"cascowfs {version}\n"


def test_wheel_builds_without_warnings_and_ships_py_typed_and_license(tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "cascowfs", src / "cascowfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
                           str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines()
                if WARNING.search(line) and not PIP_NOTICE.match(line)]
    assert warnings == []
    (wheel,) = (tmp_path / "dist").glob("cascowfs-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "cascowfs/py.typed" in names
    from cascowfs.monitor.server import STATIC  # every file the monitor serves ships with it

    assert {f"cascowfs/monitor/static/{name}" for name, _ in STATIC.values()} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in meta.splitlines()
