"""The monitor as a person meets it: a ``cascowfs monitor`` process and Debian's Chromium.

``monitor(mnt, *args)``       a running ``cascowfs monitor MNT --listen 127.0.0.1:0`` (its URL
                              as ``.url``), terminated in ``finally``
``chromium_unavailable()``    why no headless Chromium can be driven here (None if it can)
``chromium()``                a Selenium driver of the system's Chromium and chromedriver (no
                              browser download), in a fresh profile, quit in ``finally``
``fake_mount(dir, ...)``      a plain directory laid out like a mount's files, for the monitor
                              tests that need no daemon
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from support.processes import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Chromium as root needs --no-sandbox; the rest keeps it off the network it has no use for.
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1400,1000")


@dataclass
class MonitorProcess:
    proc: subprocess.Popen
    url: str


@contextlib.contextmanager
def monitor(mnt: Path, *args: str) -> Iterator[MonitorProcess]:
    """The monitor's log goes to a file (a pipe nobody reads could fill and stall it)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "cascowfs", "monitor", str(mnt),
                                 "--listen", "127.0.0.1:0", "--json", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            line = proc.stdout.readline()
            try:
                started = json.loads(line)
            except ValueError:
                log.seek(0)
                raise AssertionError(f"monitor did not start: {line!r}\n{log.read().decode()}")
            assert started["mountpoint"] == str(mnt) and started["url"].startswith("http://")
            yield MonitorProcess(proc, started["url"])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            proc.stdout.close()


def chromium_unavailable() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"needs Debian's {package} ({path}; tools/install.sh installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (the test extra)"
    return None


@contextlib.contextmanager
def chromium() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cascowfs-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def fake_mount(root: Path, episodes: list[dict] | None, branches: dict[str, str | None],
               events: list[dict] | None = None, metrics: bytes | None = None) -> Path:
    """Lay out ``root`` as a mount's files: ``episodes``/``events`` as JSON Lines when given
    (absent otherwise, as on a daemon that serves none), ``branches/<name>/parent``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "snapshots").mkdir(exist_ok=True)
    (root / "branches").mkdir(exist_ok=True)
    for name, data in (("episodes", episodes), ("events", events)):
        if data is not None:
            write_lines(root / name, data)
    if metrics is not None:
        (root / "metrics").write_bytes(metrics)
    for name, parent in branches.items():
        (root / "branches" / name).mkdir(exist_ok=True)
        (root / "branches" / name / "parent").write_text(f"{parent}\n" if parent else "")
    return root


def write_lines(path: Path, objects: list[dict]) -> None:
    """Replace ``path`` at once (a reader never sees half of it), as the daemon generates it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(o) + "\n" for o in objects))
    os.replace(tmp, path)


def episode(ident: str, parent: str | None, created_ns: int, **labels: str) -> dict:
    return {"id": ident, "parent": parent, "created": "2026-12-05T12:00:00Z",
            "created_ns": created_ns, "labels": labels, "files": 1, "size": 10,
            "root": "00" * 32, "obs": None}
