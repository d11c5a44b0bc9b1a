"""YAML configuration → frozen, validated dataclasses.

Every problem becomes one line naming the file (with line number), the image id and the field; all
problems in a file are collected and reported together, and nothing runs while any remain.

Paths: ``source`` and ``.reg`` files are relative to the config file; ``workdir`` and ``output_dir``
are relative to the directory the pipeline is started from (the repository root for ``make``).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.choices import (
    DEFAULT_DISK_CACHE,
    DEFAULT_DISK_IO,
    IO_NATIVE_CACHES,
    Adapter,
    BootExpect,
    DiskBus,
    DiskCache,
    DiskFormat,
    DiskIo,
    GhostBackend,
    NetworkRestore,
    NicModel,
    PathStyle,
    Scheduler,
    VmdkType,
    VmwareTools,
    values,
)
from pipeline.core.errors import InputError
from pipeline.core.receipts import RUNTIME
from pipeline.core.safeio import MiB, escape, file_kind, read_capped, shown
from pipeline.core.settings import Settings, password_from_env, resolve

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")  # \Z: "$" would accept a trailing newline
MAX_CONFIG_BYTES = 1 * MiB  # a config is read only up to this size
MAX_YAML_DEPTH = 64  # nesting of mappings/sequences
MAX_YAML_ALIASES = 1000  # alias (*name) uses
MAX_YAML_NODES = 200_000  # nodes once aliases are expanded (the "billion laughs" bound)
#: the one suffix → qemu-img format rule of a disk source (inspect reads it; ``format:`` overrides)
DISK_FORMAT_BY_SUFFIX = {".vmdk": "vmdk", ".qcow2": "qcow2", ".raw": "raw", ".img": "raw", ".vhd": "vpc",
                         ".vhdx": "vhdx"}
GHO_SUFFIX = ".gho"  # a Ghost image: ghost-convert makes the disk
VM_SUFFIXES = (".vmx", ".ovf")  # a VM description: resolved to its disks by pipeline.steps.vm_source
SOURCE_SUFFIXES = (*DISK_FORMAT_BY_SUFFIX, GHO_SUFFIX, *VM_SUFFIXES)
BUILTIN_REGISTRY = ("mergeide",)
MAC_RE = re.compile(r"^52:54:00(:[0-9a-f]{2}){3}\Z")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


class ConfigError(InputError):
    """All problems found in one config file; ``errors`` holds one line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} config error(s): " + "; ".join(errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True)
class GhostConfig:
    backend: GhostBackend = GhostBackend.NATIVE
    command: tuple[str, ...] = ()
    path_style: PathStyle = PathStyle.POSIX
    vmdk_type: VmdkType = VmdkType.AUTO  # resolved by for_format
    vmdk_size_mb: int | None = None
    vmdk_split_mb: int | None = None
    adapter: Adapter = Adapter.IDE
    password_env: str | None = None
    timeout_s: int = field(default=14400, metadata=RUNTIME)  # not an input: changes nothing made
    #: native reader: blocks decoded at once (None: every CPU the process may use); same disk for any value
    decode_threads: int | None = field(default=None, metadata=RUNTIME)

    def for_format(self, final_format: str) -> GhostConfig:
        """This section as Ghost runs it for a final disk in ``final_format``: ``vmdk_type: auto``
        becomes ``flat`` when that disk is raw and no split is asked (the flat VMDK's one extent is
        then a raw disk convert adopts: written once, :mod:`pipeline.steps.adopt`), else ``sparse``
        (qcow2 is a copy of the VMDK either way, and a sparse VMDK is the smaller one). An explicit
        type is kept."""
        if self.vmdk_type != VmdkType.AUTO:
            return self
        raw = final_format == DiskFormat.RAW and self.vmdk_split_mb is None
        return replace(self, vmdk_type=VmdkType.FLAT if raw else VmdkType.SPARSE)

    def password(self, image_id: str, step: str = "ghost-convert") -> str | None:
        """The image password from the environment variable named by ``password_env`` (None if none)."""
        return password_from_env(self.password_env, what="ghost.password_env", image_id=image_id, step=step)


@dataclass(frozen=True)
class BootCheck:
    """``boot_check: 120`` (= ``{seconds: 120, expect: any}``) or ``{seconds: N, expect: E}``; 0 = off."""

    seconds: int = 0
    expect: BootExpect = BootExpect.ANY

    def __bool__(self) -> bool:
        return self.seconds > 0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "expect": self.expect}


@dataclass(frozen=True)
class VirtioConfig:
    """``virtio: {drivers: PATH}``: a virtio-win ISO or folder (``viostor/<os>/<arch>/viostor.sys``)."""

    drivers: Path


@dataclass(frozen=True)
class ImageConfig:
    id: str
    source: Path
    workdir: Path = Path("var/work")
    output_dir: Path = Path("var/images")
    format: DiskFormat = DiskFormat.RAW
    libvirt_uri: str = "test:///default"
    memory_mib: int | None = None  # None: by Windows version (pipeline.model.windows.default_memory_mib)
    vcpus: int = 1
    disk_bus: DiskBus = DiskBus.IDE
    nic_model: NicModel | None = None  # None: by Windows version (pipeline.model.windows.default_nic)
    network: str = "user"
    disk_cache: DiskCache = DEFAULT_DISK_CACHE
    disk_io: DiskIo = DEFAULT_DISK_IO
    cdrom: bool | Path = False  # True: empty IDE CD-ROM drive; a Path: that ISO in it
    virtio: VirtioConfig | None = None
    registry: tuple[str, ...] = ("mergeide",)
    registry_remap_controlset: bool = False
    keep_autoreboot: bool = False  # true: leave CrashControl\AutoReboot as the guest has it
    keep_cpu_drivers: bool = False  # true: leave intelppm/amdppm boot/system start
    keep_boot_geometry: bool = False  # true: leave an XP/2003 NTFS boot sector's heads/sectors as they are
    vmware_tools: VmwareTools = VmwareTools.KEEP
    network_restore: NetworkRestore = NetworkRestore.OFF
    uefi_loader: str | None = None  # a firmware path on the libvirt host; None: libvirt's autoselection
    secure_boot: bool = False
    verify: bool = True
    name: str | None = None
    title: str | None = None
    description: str | None = None
    uuid: str | None = None
    mac: str | None = None
    autostart: bool = False
    boot_check: BootCheck = field(default_factory=BootCheck)
    start: bool = False
    ghost: GhostConfig = field(default_factory=GhostConfig)
    # docs/safety.md: replace an existing final disk gho2kvm did not make; what the disk must hold
    overwrite: bool = field(default=False, metadata=RUNTIME)
    expect_os: str = "windows"  # windows | any ("os unknown" fails the image unless any)
    vm_disk_dirs: tuple[Path, ...] = ()  # folders outside a .vmx's own folder its disks may lie in
    # set by the loader and pipeline.steps.vm_source, not config keys:
    vm: Path | None = field(default=None, metadata={"internal": True})  # the .vmx the image came from
    given: frozenset[str] = field(default=frozenset(), metadata={"internal": True})  # keys the config set
    # (key, value, where it came from: vmx / config / default), for ``gho2kvm plan``
    origins: tuple[tuple[str, str, str], ...] = field(default=(), metadata={"internal": True})

    @property
    def domain_name(self) -> str:
        return self.name or self.id

    @property
    def image_dir(self) -> Path:
        return self.workdir / self.id

    @property
    def final_disk(self) -> Path:
        return self.output_dir / f"{self.id}.{self.format}"


@dataclass(frozen=True)
class Config:
    path: Path
    images: tuple[ImageConfig, ...]
    settings: Settings = field(default_factory=Settings)

    def image(self, image_id: str) -> ImageConfig:
        for img in self.images:
            if img.id == image_id:
                return img
        raise InputError(f"{self.path}: no image with id '{escape(image_id, 64)}' (have: "
                         f"{', '.join(i.id for i in self.images) or 'none'})")


# ---------------------------------------------------------------------------------------------
# YAML loading with line numbers


class _Map(dict):
    lines: dict[str, int]
    line: int


class _Loader(yaml.SafeLoader):
    """SafeLoader with bounds: nesting depth, alias uses and the size the aliases expand to are
    capped while composing, before any Python object is built (or repr()'d in a message)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _limit(self.peek_event(), f"more than {MAX_YAML_ALIASES} aliases")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _limit(self.peek_event(), f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _limit(event: Any, what: str) -> yaml.YAMLError:
    return yaml.composer.ComposerError(None, None, f"refused: {what}", event.start_mark)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes of the document with every alias expanded (memoised, so linear in the
    composed size); refuse more than MAX_YAML_NODES and recursive aliases."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            if id(node) in sizes:
                continue
            if id(node) in visiting:
                raise yaml.composer.ComposerError(None, None, "refused: an alias refers to itself",
                                                  node.start_mark)
            visiting.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
            continue
        visiting.discard(id(node))
        total = 1 + sum(sizes.get(id(c), 1) for c in children)
        if total > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"refused: aliases expand to more than {MAX_YAML_NODES} values", node.start_mark)
        sizes[id(node)] = total


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)  # YAML merge keys (<<: *defaults)
    m = _Map()
    m.lines = {}
    m.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "a sequence" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, found {kind}", key_node.start_mark)
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, found {type(key).__name__}",
                key_node.start_mark) from None
        m[key] = loader.construct_object(value_node, deep=True)
        m.lines[str(key)] = key_node.start_mark.line + 1
    return m


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# ---------------------------------------------------------------------------------------------
# Field rules: name -> (type description, check(value) -> normalised value or raises ValueError)

_IMAGE_KEYS = {f.name for f in fields(ImageConfig) if not f.metadata.get("internal")}
_DEFAULT_KEYS = _IMAGE_KEYS - {"id", "source", "name", "uuid", "mac", "title", "description"}
_GHOST_KEYS = {f.name for f in fields(GhostConfig)}
_VIRTIO_KEYS = {f.name for f in fields(VirtioConfig)}
_SETTINGS_KEYS = {f.name for f in fields(Settings)}


def _choice(choice: type[Any]):
    """A closed choice of :mod:`pipeline.core.choices`: the value becomes the enum member."""
    options = values(choice)

    def check(v: Any) -> Any:
        if not isinstance(v, str) or v not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {shown(v)}")
        return choice(v)

    return check


def _int_range(lo: int, hi: int):
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {shown(v)}")
        if not lo <= v <= hi:
            raise ValueError(f"expected {lo}..{hi}, got {v}")
        return v

    return check


def _opt(check):
    def wrapped(v: Any):
        return None if v is None else check(v)

    return wrapped


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {shown(v)}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {shown(v)}")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {shown(v)}")
    return v


def _regex(rx: re.Pattern, what: str):
    def check(v: Any) -> str:
        if not isinstance(v, str) or not rx.match(v.lower()):
            raise ValueError(f"expected {what}, got {shown(v)}")
        return v.lower()

    return check


_BOOT_CHECK_SECONDS = _int_range(0, 3600)
_BOOT_CHECK_EXPECT = _choice(BootExpect)


def _boot_check(v: Any) -> BootCheck:
    if not isinstance(v, dict):
        try:
            return BootCheck(seconds=_BOOT_CHECK_SECONDS(v))
        except ValueError as e:
            raise ValueError(f"{e} (seconds, or a mapping {{seconds: N, expect: "
                             f"{'|'.join(values(BootExpect))}}})") from None
    lines = getattr(v, "lines", {})
    where = {k: f" (line {lines[k]})" if k in lines else "" for k in map(str, v)}
    for key in v:
        if key not in ("seconds", "expect"):
            raise ValueError(f"key '{key}'{where[str(key)]}: {_unknown_key_msg(key, {'seconds', 'expect'})}")
    try:
        seconds = _BOOT_CHECK_SECONDS(v.get("seconds", 120))
    except ValueError as e:
        raise ValueError(f"seconds{where.get('seconds', '')}: {e}") from None
    try:
        expect = _BOOT_CHECK_EXPECT(v.get("expect", BootExpect.ANY.value))
    except ValueError as e:
        raise ValueError(f"expect{where.get('expect', '')}: {e}") from None
    return BootCheck(seconds=seconds, expect=expect)


def _network(v: Any) -> str:
    if isinstance(v, str) and (v == "user" or re.match(r"^(network|bridge):[A-Za-z0-9._-]+\Z", v)):
        return v
    raise ValueError(f"expected user, network:NAME or bridge:NAME, got {shown(v)}")


def _libvirt_uri(v: Any) -> str:
    if isinstance(v, str) and re.match(r"^[a-z][a-z0-9+]*://", v):
        return v
    raise ValueError(f"expected a libvirt URI such as qemu:///system, got {shown(v)}")


def _registry(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"expected a list of built-in names ({', '.join(BUILTIN_REGISTRY)}) "
                         f"or .reg file paths, got {shown(v)}")
    for x in v:
        if x not in BUILTIN_REGISTRY and not x.lower().endswith(".reg"):
            raise ValueError(f"expected a built-in name ({', '.join(BUILTIN_REGISTRY)}) or a path "
                             f"ending in .reg, got {shown(x)}")
    return tuple(v)


def _cdrom(v: Any) -> bool | str:
    if isinstance(v, bool) or (isinstance(v, str) and v.lower().endswith(".iso")):
        return v
    raise ValueError(f"expected true (an empty drive) or a path ending in .iso, got {v!r}")


def _command(v: Any) -> tuple[str, ...]:
    if isinstance(v, str) and v:
        return (v,)
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return tuple(v)
    raise ValueError(f"expected an argv list such as [wine64, /opt/ghost/ghost64.exe], got {shown(v)}")


def _dirs(v: Any) -> tuple[Path, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or len(items) > 64 or not all(
            isinstance(x, str) and x and "\x00" not in x and os.path.isabs(x) for x in items):
        raise ValueError(f"expected an absolute folder path or a list of them, got {shown(v)}")
    return tuple(Path(os.path.normpath(x)) for x in items)


def _env_name(v: Any) -> str:
    if isinstance(v, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", v):
        return v
    raise ValueError(f"expected an environment variable name, got {shown(v)}")


IMAGE_RULES: dict[str, Any] = {
    "workdir": _str,
    "output_dir": _str,
    "format": _choice(DiskFormat),
    "libvirt_uri": _libvirt_uri,
    "memory_mib": _int_range(64, 4 * 1024 * 1024),
    "vcpus": _int_range(1, 512),
    "disk_bus": _choice(DiskBus),
    "nic_model": _choice(NicModel),
    "network": _network,
    "disk_cache": _choice(DiskCache),
    "disk_io": _choice(DiskIo),
    "cdrom": _cdrom,
    "registry": _registry,
    "registry_remap_controlset": _bool,
    "keep_autoreboot": _bool,
    "keep_cpu_drivers": _bool,
    "keep_boot_geometry": _bool,
    "vmware_tools": _choice(VmwareTools),
    "network_restore": _choice(NetworkRestore),
    "uefi_loader": _opt(_str),
    "secure_boot": _bool,
    "verify": _bool,
    "name": _regex(re.compile(r"^.{1,200}$", re.S), "a domain name"),
    "title": _text,
    "description": _text,
    "uuid": _regex(UUID_RE, "a UUID like 6f1c0a0e-8d3e-4f53-9a57-2c3b9d0e1f22"),
    "mac": _regex(MAC_RE, "a MAC address 52:54:00:xx:xx:xx"),
    "autostart": _bool,
    "boot_check": _boot_check,
    "start": _bool,
    "overwrite": _bool,
    "expect_os": _regex(re.compile(r"^(windows|any)\Z"), "windows or any"),
    "vm_disk_dirs": _dirs,
}
GHOST_RULES: dict[str, Any] = {
    "backend": _choice(GhostBackend),
    "command": _command,
    "path_style": _choice(PathStyle),
    "vmdk_type": _choice(VmdkType),
    "vmdk_size_mb": _opt(_int_range(1, 64 * 1024 * 1024)),
    "vmdk_split_mb": _opt(_int_range(1, 64 * 1024 * 1024)),
    "adapter": _choice(Adapter),
    "password_env": _opt(_env_name),
    "timeout_s": _int_range(1, 7 * 24 * 3600),
    "decode_threads": _opt(_int_range(1, 256)),
}
SETTINGS_RULES: dict[str, Any] = {
    "force_tcg": _bool,
    "scheduler": _choice(Scheduler),
    "scheduler_url": _regex(re.compile(r"^https?://"), "an http(s) URL"),
    "progress": _bool,
}


class _Collector:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[str] = []

    def add(self, line: int | None, image: str | None, fieldname: str | None, msg: str) -> None:
        loc = f"{escape(self.path, 300)}:{line}" if line else escape(self.path, 300)
        parts = [loc]
        if image is not None:
            parts.append(f"image '{escape(image, 64)}'")
        if fieldname:
            parts.append(f"field '{escape(fieldname, 64)}'")
        # one line, bounded: whatever the values quoted in msg hold
        self.errors.append(": ".join(parts) + f": {escape(msg, 400)}")


def _unknown_key_msg(key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key{hint}"


def _check_section(
    col: _Collector, data: _Map, rules: dict[str, Any], allowed: set[str], image: str | None,
    prefix: str = "",
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        line = data.lines.get(str(key))
        name = f"{prefix}{key}"
        if key not in allowed:
            col.add(line, image, name, _unknown_key_msg(key, allowed))
            continue
        if _has_nul(value):
            col.add(line, image, name, "contains a NUL character")
            continue
        rule = rules.get(key)
        if rule is None:
            out[key] = value
            continue
        try:
            out[key] = rule(value)
        except ValueError as e:
            col.add(line, image, name, str(e))
    return out


def _ghost(col: _Collector, raw: Any, line: int | None, image: str | None,
           prefix: str = "") -> dict[str, Any] | None:
    if not isinstance(raw, _Map):
        col.add(line, image, f"{prefix}ghost", f"expected a mapping, got {shown(raw)}")
        return None
    return _check_section(col, raw, GHOST_RULES, _GHOST_KEYS, image, prefix=f"{prefix}ghost.")


def _load_yaml(path: Path, col: _Collector) -> Any:
    """The YAML document of ``path``: a regular file of at most MAX_CONFIG_BYTES, UTF-8, bounded
    (depth, aliases, expansion); any problem is a ConfigError line, never a traceback."""
    try:
        raw = read_capped(path, MAX_CONFIG_BYTES, "config")
    except InputError as e:
        raise ConfigError([e.message]) from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col.add(line, None, None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save the "
                                  "config as UTF-8")
        raise ConfigError(col.errors) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        col.add(mark.line + 1 if mark else None, None, None,
                f"not valid YAML: {getattr(e, 'problem', None) or e}")
    except RecursionError:
        col.add(None, None, None, f"not valid YAML: nested deeper than {MAX_YAML_DEPTH} levels")
    except (ValueError, TypeError, OverflowError, ArithmeticError) as e:
        # e.g. an integer of more than 4300 digits, a date like 2001-13-45, an odd tag
        col.add(None, None, None, f"not valid YAML: {type(e).__name__}: {e}")
    raise ConfigError(col.errors)


def load_config(path: str | os.PathLike[str], *, check_sources: bool = True,
                flags: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load and validate a config file; raise :class:`ConfigError` listing every problem.

    ``flags``: settings given on the command line (None = not given; checked like the YAML ones,
    ``--scheduler-url`` for ``scheduler_url``); they and the environment take precedence over the
    ``settings:`` section (:func:`pipeline.core.settings.resolve`).
    """
    path = Path(path)
    col = _Collector(path)
    doc = _load_yaml(path, col)
    if not isinstance(doc, _Map):
        raise ConfigError([f"{escape(path, 300)}: expected a mapping with 'images' "
                           "(and optional 'defaults')"])
    for key in doc:
        if key not in ("defaults", "images", "settings"):
            col.add(doc.lines.get(str(key)), None, str(key),
                    _unknown_key_msg(key, {"defaults", "images", "settings"}))

    settings: dict[str, Any] = {}
    if "settings" in doc:
        raw = doc["settings"]
        if isinstance(raw, _Map):
            settings = _check_section(col, raw, SETTINGS_RULES, _SETTINGS_KEYS, None, "settings.")
        else:
            col.add(doc.lines.get("settings"), None, "settings", "expected a mapping")

    defaults: dict[str, Any] = {}
    default_ghost: dict[str, Any] = {}
    if "defaults" in doc and doc["defaults"] is not None:
        raw = doc["defaults"]
        if isinstance(raw, _Map):
            defaults = _check_section(col, _sub(raw, ("virtio",)), IMAGE_RULES, _DEFAULT_KEYS, None,
                                      "defaults.")
            if "virtio" in raw:
                defaults["virtio"] = _virtio(col, raw["virtio"], raw.lines.get("virtio"), None, "defaults.")
            if "ghost" in defaults:
                default_ghost = _ghost(col, defaults.pop("ghost"), raw.lines.get("ghost"), None,
                                       "defaults.") or {}
        else:
            col.add(doc.lines.get("defaults"), None, "defaults", "expected a mapping")

    images_raw = doc.get("images")
    if not isinstance(images_raw, list) or not images_raw:
        col.add(doc.lines.get("images"), None, "images", "expected a non-empty list of images")
        images_raw = []

    base = path.parent
    reg_checked: dict[Path, str | None] = {}
    seen: dict[str, int] = {}
    images: list[ImageConfig] = []
    for idx, raw in enumerate(images_raw):
        if not isinstance(raw, _Map):
            col.add(None, f"#{idx + 1}", None, f"expected a mapping with id and source, got {shown(raw)}")
            continue
        image_id = raw.get("id")
        label = escape(image_id, 64) if isinstance(image_id, (str, int)) else f"#{idx + 1}"
        before = len(col.errors)
        if isinstance(image_id, str) and image_id and image_id.strip(".") == "":
            col.add(raw.lines.get("id", raw.line), label, "id",
                    f"{shown(image_id)} is not a usable id (it names a folder, not an image)")
        elif not isinstance(image_id, str) or not ID_RE.match(image_id):
            col.add(raw.lines.get("id", raw.line), label, "id",
                    f"expected 1-64 characters of [A-Za-z0-9._-], got {shown(image_id)}")
        elif image_id in seen:
            col.add(raw.lines.get("id"), label, "id", f"duplicate id (first used on line {seen[image_id]})")
        else:
            seen[image_id] = raw.lines.get("id", raw.line)
        values = dict(defaults)
        values.update(_check_section(col, _sub(raw, ("id", "source", "ghost", "virtio")), IMAGE_RULES,
                                     _IMAGE_KEYS, label))
        values["given"] = frozenset(values)
        if "virtio" in raw:
            values["virtio"] = _virtio(col, raw["virtio"], raw.lines.get("virtio"), label)
        _guest_paths(col, values, raw, base, label)
        ghost_values = dict(default_ghost)
        if "ghost" in raw:
            ghost_values.update(_ghost(col, raw["ghost"], raw.lines.get("ghost"), label) or {})
        source = raw.get("source")
        src_path: Path | None = None
        if isinstance(source, list) and len(source) > 1:
            col.add(raw.lines.get("source", raw.line), label, "source",
                    f"a list of {len(source)} disks: several disks per image are not supported yet; name the "
                    "system disk")
        elif not isinstance(source, str) or not source or "\x00" in source:
            col.add(raw.lines.get("source", raw.line), label, "source", "expected a path to the source image")
        else:
            src_path = (base / source) if not os.path.isabs(source) else Path(source)
            src_path = Path(os.path.normpath(src_path.absolute()))
            if not src_path.name.lower().endswith(SOURCE_SUFFIXES):
                col.add(raw.lines.get("source"), label, "source",
                        f"expected one of {' '.join(SOURCE_SUFFIXES)}, got {shown(src_path.name)}")
            elif check_sources and (problem := _not_regular(src_path)):
                col.add(raw.lines.get("source"), label, "source", problem)
        regs = values.get("registry", ())
        for r in regs:
            if r in BUILTIN_REGISTRY:
                continue
            rp = Path(os.path.normpath((base / r).absolute())) if not os.path.isabs(r) else Path(r)
            if problem := _not_regular(rp):
                col.add(raw.lines.get("registry", raw.line), label, "registry", problem)
            else:
                problem = _reg_problem(rp, reg_checked)
                if problem:
                    col.add(raw.lines.get("registry", raw.line), label, "registry", problem)
        if len(col.errors) != before or src_path is None:
            continue
        if "registry" in values:
            values["registry"] = tuple(
                r if r in BUILTIN_REGISTRY or os.path.isabs(r) else os.path.normpath((base / r).absolute())
                for r in values["registry"]
            )
        for key in ("workdir", "output_dir"):
            if key in values:
                values[key] = Path(os.path.abspath(values[key]))
        values.setdefault("workdir", Path(os.path.abspath("var/work")))
        values.setdefault("output_dir", Path(os.path.abspath("var/images")))
        if ghost_values.get("backend") == "exe" and not ghost_values.get("command"):
            col.add(raw.lines.get("ghost", raw.line), label, "ghost.command",
                    "backend exe needs a command such as [wine64, /opt/ghost/ghost64.exe]")
            continue
        if "backend" not in ghost_values and ghost_values.get("command"):
            ghost_values["backend"] = GhostBackend.EXE
        assert isinstance(image_id, str)
        images.append(ImageConfig(id=image_id, source=src_path, ghost=GhostConfig(**ghost_values), **values))

    given: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        try:
            given[key] = SETTINGS_RULES[key](value)
        except ValueError as e:
            col.add(None, None, f"--{key.replace('_', '-')}", str(e))
    if col.errors:
        raise ConfigError(col.errors)
    return Config(path=path, images=tuple(images), settings=resolve(settings, flags=given, environ=environ))


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(isinstance(v, str) and "\x00" in v for v in value)
    return False


def _not_regular(path: Path) -> str | None:
    """None for an existing regular file (stat only: a FIFO or device is never opened)."""
    try:
        kind = file_kind(os.stat(path).st_mode)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return f"file not found: {path}"
    return None if kind is None else f"{path} is {kind}, expected a regular file"


def _virtio(col: _Collector, raw: Any, line: int | None, image: str | None,
            prefix: str = "") -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, _Map):
        col.add(line, image, f"{prefix}virtio", f"expected a mapping such as {{drivers: virtio-win.iso}}, "
                f"got {raw!r}")
        return None
    before = len(col.errors)
    out = _check_section(col, raw, {"drivers": _str}, _VIRTIO_KEYS, image, prefix=f"{prefix}virtio.")
    if "drivers" not in out:
        if len(col.errors) == before:
            col.add(line, image, f"{prefix}virtio.drivers", "expected the path of a virtio-win ISO or folder")
        return None
    out["_line"] = raw.lines.get("drivers", line)
    return out


def _guest_paths(col: _Collector, values: dict[str, Any], raw: _Map, base: Path, label: str) -> None:
    """Resolve ``cdrom`` and ``virtio.drivers`` against the config's folder and check they exist;
    check that ``disk_io`` and ``disk_cache`` go together."""
    cdrom = values.get("cdrom")
    if isinstance(cdrom, str):
        p = Path(os.path.normpath((base / cdrom).absolute()))
        if not p.is_file():
            col.add(raw.lines.get("cdrom", raw.line), label, "cdrom", f"file not found: {p}")
        values["cdrom"] = p
    virtio = values.get("virtio")
    if isinstance(virtio, dict):
        p = Path(os.path.normpath((base / virtio["drivers"]).absolute()))
        line = virtio.get("_line") or raw.lines.get("virtio", raw.line)
        if not (p.is_dir() or (p.is_file() and p.suffix.lower() == ".iso")):
            col.add(line, label, "virtio.drivers", f"expected a virtio-win folder or .iso file, not found: "
                    f"{p}")
        values["virtio"] = VirtioConfig(drivers=p)
    io, cache = values.get("disk_io", DEFAULT_DISK_IO), values.get("disk_cache", DEFAULT_DISK_CACHE)
    if io == "native" and cache not in IO_NATIVE_CACHES:
        col.add(raw.lines.get("disk_io", raw.lines.get("disk_cache", raw.line)), label, "disk_io",
                f"disk_io 'native' needs disk_cache {' or '.join(IO_NATIVE_CACHES)} (qemu's native AIO opens "
                f"the file with O_DIRECT), got disk_cache '{cache}'; use disk_io threads")


def _reg_problem(path: Path, cache: dict[Path, str | None]) -> str | None:
    """Parse a user ``.reg`` file once per load: a malformed one is a config error (file:line)."""
    if path not in cache:
        from pipeline.registry.plan import plan
        from pipeline.registry.regfile import RegSyntaxError, parse_file

        try:
            plan(parse_file(path), 1)  # syntax, and keys outside HKLM\SYSTEM / HKLM\SOFTWARE
            cache[path] = None
        except RegSyntaxError as e:
            cache[path] = e.message
        except InputError as e:  # not a regular file, too large, unreadable
            cache[path] = e.message
        except OSError as e:
            cache[path] = f"cannot read {path}: {e.strerror}"
    return cache[path]


def _sub(raw: _Map, drop: tuple[str, ...]) -> _Map:
    m = _Map({k: v for k, v in raw.items() if k not in drop})
    m.lines = raw.lines
    m.line = raw.line
    return m
