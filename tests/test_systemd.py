"""The shipped systemd units pass `systemd-analyze verify` (errors *and* warnings), and the
service unit says what the daemon relies on (Type=notify, restart on failure, no mount
namespace that would hide our mounts from the rest of the machine)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "cascowfs@.service"
EXAMPLE = REPO / "systemd" / "example-agent.service"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="needs systemd-analyze")


def _installed_cli() -> str:
    """Where the CLI of this checkout lives (the unit names /usr/local/bin/cascowfs, the
    documented install location; verify checks that the binary exists)."""
    cli = Path(sys.executable).parent / "cascowfs"
    assert cli.exists(), cli
    return str(cli)


@needs_analyze
def test_units_verify_cleanly(tmp_path):
    text = UNIT.read_text()
    assert "/usr/local/bin/cascowfs" in text
    instance = tmp_path / "cascowfs@mnt-cascowfs.service"
    instance.write_text(text.replace("/usr/local/bin/cascowfs", _installed_cli()))
    example = tmp_path / EXAMPLE.name
    example.write_text(EXAMPLE.read_text())
    proc = subprocess.run(["systemd-analyze", "verify", str(instance), str(example)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    assert proc.returncode == 0, proc.stderr
    noise = [l for l in proc.stderr.splitlines() if l.strip()]
    assert noise == [], proc.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path):
    """Guard against a vacuous pass: a typo must show up."""
    broken = tmp_path / "cascowfs@mnt-x.service"
    broken.write_text(UNIT.read_text().replace("/usr/local/bin/cascowfs", _installed_cli())
                      .replace("Type=notify", "Type=notifyy"))
    proc = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 or "notifyy" in proc.stderr


def _parse(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keep key case
    cp.read_string(path.read_text())
    return cp


def test_service_unit_contract():
    unit = _parse(UNIT)
    svc = unit["Service"]
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "on-failure"
    assert "%f" in svc["ExecStart"] and "${CASCOWFS_STORE}" in svc["ExecStart"]
    assert svc["ExecStart"].split()[1] == "mount"
    assert svc["EnvironmentFile"] == "/etc/cascowfs/%i.env"
    for forbidden in ("ProtectSystem", "PrivateTmp", "ProtectHome", "ReadWritePaths",
                      "PrivateDevices", "PrivateMounts", "MountFlags", "TemporaryFileSystem"):
        assert forbidden not in svc, f"{forbidden} would hide our mounts in a private namespace"
    assert "CAP_SYS_ADMIN" in svc["CapabilityBoundingSet"]
    assert "CAP_SYS_NICE" in svc["CapabilityBoundingSet"], "the daemon could not raise its priority"
    example = _parse(EXAMPLE)
    assert example["Unit"]["After"] == example["Unit"]["Requires"] == \
        "cascowfs@mnt-cascowfs.service"
