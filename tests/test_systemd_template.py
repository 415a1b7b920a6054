"""systemd/chatgateway@.service: it verifies as an instance, and it is chatgateway.service per name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_systemd_unit import (
    INSTALLED_BINARY,
    MAX_EXPOSURE,
    ROOT,
    UNIT,
    systemd_analyze,  # noqa: F401  (fixture)
    unit_settings,
)

TEMPLATE = ROOT / "systemd" / "chatgateway@.service"

#: The settings the template changes, and to what: the rest must equal the single unit's.
PER_INSTANCE = {
    "Unit.Description": "chatgateway instance %i: connects tenants' AI agents to Slack, Discord "
    "and web chat",
    "Service.ExecStart": f"{INSTALLED_BINARY} run --config /etc/chatgateway/%i.yaml",
    "Service.SyslogIdentifier": "chatgateway@%i",
    "Service.StateDirectory": "chatgateway/%i",
    "Service.WorkingDirectory": "%S/chatgateway/%i",
}


@pytest.fixture
def instance_unit(tmp_path: Path) -> Path:
    """The template with this venv's binary, and the path of its instance `a`."""
    binary = Path(sys.executable).parent / "chatgateway"
    assert binary.exists(), f"{binary} missing: pip install -e . into the venv"
    (tmp_path / TEMPLATE.name).write_text(TEMPLATE.read_text().replace(INSTALLED_BINARY,
                                                                       str(binary)))
    return tmp_path / "chatgateway@a.service"


@pytest.mark.systemd
def test_an_instance_verifies_without_warnings(systemd_analyze: str, instance_unit: Path):  # noqa: F811
    result = subprocess.run(
        [systemd_analyze, "verify", str(instance_unit)],
        capture_output=True, text=True, timeout=60, cwd=instance_unit.parent,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "chatgateway" in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], "verify warns about the template:\n" + "\n".join(ours)


@pytest.mark.systemd
def test_an_instance_is_as_hardened_as_the_single_unit(systemd_analyze: str,  # noqa: F811
                                                        instance_unit: Path):
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", str(instance_unit)],
        capture_output=True, text=True, timeout=60, cwd=instance_unit.parent,
    )
    match = re.search(r"Overall exposure level for chatgateway@a\.service: (\d+\.\d+)",
                      result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_the_template_differs_from_the_single_unit_only_per_instance():
    single, template = unit_settings(UNIT.read_text()), unit_settings(TEMPLATE.read_text())
    for key, value in PER_INSTANCE.items():
        assert template.pop(key) == [value], key
        single.pop(key)
    assert template == single
