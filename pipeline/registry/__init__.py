"""Offline Windows registry changes: ``.reg`` parsing, hive mapping, merge and verification.

Typical use by the task (hive files already downloaded from the guest)::

    ops = builtin_ops("mergeide", major, minor) + parse_file(user_reg)
    for hive, hive_ops in plan(ops, "ControlSet001").items():
        apply_reg(local[hive], to_reg_text(hive_ops), HIVE_PREFIXES[hive], image_id=img)
        problems = verify(local[hive], hive_ops, image_id=img)
"""

from pipeline.registry.builtin import builtin_names, builtin_ops, required_drivers
from pipeline.registry.hive import apply_reg, export, export_text, write_empty_hive
from pipeline.registry.plan import HIVE_PREFIXES, control_set_name, hive_relative, map_key, plan
from pipeline.registry.regfile import (
    Op,
    RegSyntaxError,
    RegType,
    parse_bytes,
    parse_file,
    parse_text,
    to_reg_text,
)
from pipeline.registry.verify import verify

__all__ = [
    "HIVE_PREFIXES",
    "Op",
    "RegSyntaxError",
    "RegType",
    "apply_reg",
    "builtin_names",
    "builtin_ops",
    "control_set_name",
    "export",
    "export_text",
    "hive_relative",
    "map_key",
    "parse_bytes",
    "parse_file",
    "parse_text",
    "plan",
    "required_drivers",
    "to_reg_text",
    "verify",
    "write_empty_hive",
]
