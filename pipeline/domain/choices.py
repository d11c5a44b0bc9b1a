"""Allowed values of the domain options users set in the config (one place for config and model).

Defaults suit a production KVM host with the disk on local storage: ``cache='none'`` (no host page
cache, O_DIRECT; safe on power loss) with ``io='native'`` (Linux AIO, which qemu only allows on
O_DIRECT files). Disks on tmpfs (no O_DIRECT) need ``disk_cache: writeback`` + ``disk_io: threads``.
"""

from __future__ import annotations

DISK_CACHE_MODES = ("none", "writethrough", "writeback", "directsync", "unsafe", "default")
DISK_IO_MODES = ("native", "threads", "io_uring", "default")
#: qemu refuses aio=native without cache.direct=on
IO_NATIVE_CACHES = ("none", "directsync")
DEFAULT_DISK_CACHE = "none"
DEFAULT_DISK_IO = "native"
