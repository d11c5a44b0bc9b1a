"""Host-level settings, built once from the config's ``settings:`` section, the environment and the
command line (in that order of precedence: a flag beats the environment, which beats the YAML), and
the one reader of gho2kvm's environment switches and of the Ghost password variable.

Nothing else reads ``GHO2KVM_FORCE_TCG`` or ``GHO2KVM_PROGRESS``: the config object carries the
resolved :class:`Settings` and every consumer (libguestfs, host capabilities, the fingerprint of
xml-render, the progress display) takes them from there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.choices import Scheduler
from pipeline.core.errors import InputError

FORCE_TCG_ENV = "GHO2KVM_FORCE_TCG"
PROGRESS_ENV = "GHO2KVM_PROGRESS"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """Host-level settings (not per image)."""

    force_tcg: bool = False  # LIBGUESTFS_BACKEND=direct + force_tcg, domains of type qemu (tests, demo)
    scheduler: Scheduler = Scheduler.LOCAL
    scheduler_url: str = "http://127.0.0.1:8082"
    progress: bool = True  # progress bars on a TTY


#: settings an environment variable can set: field → variable
ENV_VARS = {"force_tcg": FORCE_TCG_ENV, "progress": PROGRESS_ENV}


def env_bool(name: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """The switch ``name`` in the environment: True/False, or None when unset or empty.

    Raises :class:`InputError` (one line) for a value that is neither 1/true/yes/on nor 0/false/no/off.
    """
    raw = (os.environ if environ is None else environ).get(name, "")
    text = raw.strip().lower()
    if not text:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InputError(f"environment variable {name}: expected 1/true/yes/on or 0/false/no/off, "
                     f"got {raw[:40]!r}")


def resolve(yaml_values: Mapping[str, Any] | None = None, *, flags: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from validated YAML values, the environment and command-line flags.

    A flag whose value is None was not given; an unset or empty environment variable neither.
    """
    values: dict[str, Any] = dict(yaml_values or {})
    for key, var in ENV_VARS.items():
        given = env_bool(var, environ)
        if given is not None:
            values[key] = given
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = value
    if "scheduler" in values:
        values["scheduler"] = Scheduler(values["scheduler"])
    return Settings(**values)


def password_from_env(var: str | None, *, what: str, image_id: str | None = None,
                      step: str | None = None) -> str | None:
    """The image password held by the environment variable ``var`` (None when ``var`` is None/empty).

    ``what`` names where ``var`` came from (``ghost.password_env``, ``--password-env``). An unset
    variable and an empty one are both refused with one line: Ghost has no empty password, and an
    empty value is a forgotten ``export`` far more often than an intent.
    """
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise InputError(f"{what} names environment variable {var}, which is not set; export {var} with "
                         f"the image password", image_id=image_id, step=step)
    if not value:
        raise InputError(f"environment variable {var} ({what}) is empty; export {var} with the image "
                         f"password", image_id=image_id, step=step)
    return value
