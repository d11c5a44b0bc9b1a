"""Settings built once: YAML < environment < command-line flag; the env switch parsed one way; the
Ghost password read one way (an empty value refused like an unset one). Fast: no tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.app.cli import main
from pipeline.core.choices import Scheduler
from pipeline.core.config import ConfigError, GhostConfig, load_config
from pipeline.core.errors import InputError
from pipeline.core.settings import Settings, env_bool, password_from_env, resolve
from tests.support.fx_pipeline import make_config


def _config(tmp: Path, settings: dict[str, object] | None) -> Path:
    src = tmp / "d.raw"
    src.write_bytes(b"\0" * 512)
    return make_config(tmp, [{"id": "a", "source": src}], settings=settings)


@pytest.mark.parametrize(("yaml", "env", "flag", "want"), [
    (None, None, None, False),             # default
    ({"force_tcg": True}, None, None, True),  # YAML
    ({"force_tcg": True}, "", None, True),    # an empty variable is not given
    ({"force_tcg": True}, "0", None, False),  # the environment beats the YAML
    ({"force_tcg": False}, "yes", None, True),
    ({"force_tcg": False}, "0", True, True),  # the flag beats both
    (None, "off", True, True),
])
def test_force_tcg_precedence(tmp_path: Path, yaml: dict[str, object] | None, env: str | None,
                              flag: bool | None, want: bool) -> None:
    environ = {} if env is None else {"GHO2KVM_FORCE_TCG": env}
    cfg = load_config(_config(tmp_path, yaml), flags={"force_tcg": flag}, environ=environ)
    assert cfg.settings.force_tcg is want


def test_scheduler_flag_beats_yaml_and_is_checked(tmp_path: Path) -> None:
    path = _config(tmp_path, {"scheduler": "central", "scheduler_url": "http://luigid:8082"})
    cfg = load_config(path, environ={})
    assert (cfg.settings.scheduler, cfg.settings.scheduler_url) == (Scheduler.CENTRAL, "http://luigid:8082")
    cfg = load_config(path, flags={"scheduler": "local", "scheduler_url": None}, environ={})
    assert (cfg.settings.scheduler, cfg.settings.scheduler_url) == (Scheduler.LOCAL, "http://luigid:8082")
    with pytest.raises(ConfigError) as ei:
        load_config(path, flags={"scheduler_url": "luigid:8082"}, environ={})
    assert ei.value.errors == [f"{path}: field '--scheduler-url': expected an http(s) URL, got 'luigid:8082'"]


def test_progress_from_env() -> None:
    assert resolve(environ={}).progress is True
    assert resolve({"progress": True}, environ={"GHO2KVM_PROGRESS": "0"}).progress is False


@pytest.mark.parametrize("value", ["maybe", "2", "tru"])
def test_a_garbled_switch_is_one_clear_line(value: str) -> None:
    with pytest.raises(InputError) as ei:
        env_bool("GHO2KVM_FORCE_TCG", {"GHO2KVM_FORCE_TCG": value})
    assert ei.value.one_line() == ("environment variable GHO2KVM_FORCE_TCG: expected 1/true/yes/on or "
                                   f"0/false/no/off, got '{value}'")


def test_garbled_switch_exits_2_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GHO2KVM_FORCE_TCG", "maybe")
    assert main(["validate", "--config", str(_config(tmp_path, None))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["environment variable GHO2KVM_FORCE_TCG: expected 1/true/yes/on or 0/false/no/off, "
                   "got 'maybe'"]


def test_settings_defaults() -> None:
    assert resolve(environ={}) == Settings()


# ---------------------------------------------------------------------------------------------- password


def test_password_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XP_PW", "s3cret")
    assert GhostConfig(password_env="XP_PW").password("xp") == "s3cret"
    assert GhostConfig().password("xp") is None  # no password_env: no password


@pytest.mark.parametrize(("value", "words"), [(None, "which is not set"), ("", "is empty")])
def test_unset_or_empty_password_variable_is_refused(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                                     words: str) -> None:
    monkeypatch.delenv("XP_PW", raising=False)
    if value is not None:
        monkeypatch.setenv("XP_PW", value)
    with pytest.raises(InputError) as ei:
        GhostConfig(password_env="XP_PW").password("xp")
    line = ei.value.one_line()
    assert words in line and "XP_PW" in line and "image xp" in line and "ghost-convert" in line
    with pytest.raises(InputError, match=words):  # the gho command: the same rule
        password_from_env("XP_PW", what="--password-env")


def test_gho_cli_refuses_an_empty_password_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XP_PW", "")
    gho = tmp_path / "x.gho"
    gho.write_bytes(b"\0" * 4096)
    rc = main(["gho", "info", str(gho), "--password-env", "XP_PW"])
    err = capsys.readouterr().err
    assert rc != 0 and "environment variable XP_PW (--password-env) is empty" in err and str(gho) in err
