"""The shipped systemd units (``contrib/systemd/``) as ``make install-service`` installs them.

Installed into a temp folder (paths rewritten to this checkout), they must pass ``systemd-analyze
verify`` (skipped where it is missing), run what the docs say (a oneshot migrate over the config named
in the environment file, a timer that catches up missed runs), and their command lines, with the
variables of the shipped environment file filled in, must be accepted by gho2kvm's and luigid's own
argument parsers.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.app.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
UNITS = ("gho2kvm-luigid.service", "gho2kvm-migrate.service", "gho2kvm-migrate.timer")


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    env = tmp_path / "default" / "gho2kvm"
    r = subprocess.run(["make", "-s", "install-service", f"SYSTEMD_DIR={tmp_path / 'units'}",
                        f"ENV_FILE={env}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return tmp_path


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def command(cp: configparser.ConfigParser, env: dict[str, str]) -> list[str]:
    defaults = dict(kv.split("=", 1) for kv in shlex.split(cp["Service"].get("Environment", "")))
    values = {**defaults, **env}
    line = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], cp["Service"]["ExecStart"])
    return shlex.split(line)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(installed: Path) -> None:
    units = [str(installed / "units" / u) for u in UNITS]
    r = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "gho2kvm" not in r.stderr, r.stderr


def test_units_run_the_checkout_with_the_environment_file(installed: Path) -> None:
    env_path = installed / "default" / "gho2kvm"
    env = env_file(env_path)
    assert env["GHO2KVM_CONFIG"] == str(REPO / "configs" / "site.yaml")
    migrate = unit(installed / "units" / "gho2kvm-migrate.service")
    svc = migrate["Service"]
    assert svc["Type"] == "oneshot" and svc["WorkingDirectory"] == str(REPO)
    assert svc["EnvironmentFile"] == f"-{env_path}"
    argv = command(migrate, env)
    assert argv[0] == str(REPO / ".venv" / "bin" / "gho2kvm")
    args = build_parser().parse_args(argv[1:])
    assert (args.command, str(args.config), args.scheduler) == ("migrate", env["GHO2KVM_CONFIG"], "central")
    assert args.scheduler_url == env["GHO2KVM_SCHEDULER_URL"] and args.workers == int(env["GHO2KVM_WORKERS"])

    timer = unit(installed / "units" / "gho2kvm-migrate.timer")["Timer"]
    assert timer["Persistent"] == "true" and timer["Unit"] == "gho2kvm-migrate.service"

    luigid = unit(installed / "units" / "gho2kvm-luigid.service")
    argv = command(luigid, env)
    assert argv[0] == str(REPO / ".venv" / "bin" / "luigid")
    r = subprocess.run([*argv[:1], "--help"], capture_output=True, text=True, timeout=60)
    for flag in argv[1::2]:
        assert flag in r.stdout, f"luigid has no {flag}"


def test_install_keeps_an_edited_environment_file(installed: Path) -> None:
    env_path = installed / "default" / "gho2kvm"
    env_path.write_text("GHO2KVM_CONFIG=/srv/site.yaml\n")
    r = subprocess.run(["make", "-s", "install-service", f"SYSTEMD_DIR={installed / 'units'}",
                        f"ENV_FILE={env_path}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"kept {env_path}" in r.stdout
    assert env_path.read_text() == "GHO2KVM_CONFIG=/srv/site.yaml\n"
