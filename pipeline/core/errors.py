"""Typed errors. Every message is one line naming the image, the step and what went wrong."""

from __future__ import annotations


def escape(text: object, limit: int = 120) -> str:
    """``text`` (any object: str() of it) with control and line-break characters escaped, at most
    ``limit`` characters (then ``…(+N chars)``). Cheap on huge strings: only the head is looked at."""
    s = text if isinstance(text, str) else as_text(text)
    extra = len(s) - limit
    s = s[:limit]
    out = []
    for ch in s:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0 or ch in "\u2028\u2029":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{o:02x}" if o < 0x100 else
                                                                      f"\\u{o:04x}"))
        else:
            out.append(ch)
    return "".join(out) + (f"…(+{extra} chars)" if extra > 0 else "")


def as_text(value: object) -> str:
    """str(value), also for what str() refuses (huge integers, deep structures)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    try:
        return str(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


class Gho2KvmError(Exception):
    """Base class: a failure the user should see as one clear line."""

    #: deterministic failures (bad input) are never retried; transient ones may be.
    transient = False

    def __init__(self, message: str, *, image_id: str | None = None, step: str | None = None) -> None:
        self.message = message
        self.image_id = image_id
        self.step = step
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.image_id:
            where.append(f"image {self.image_id}")
        if self.step:
            where.append(f"step {self.step}")
        prefix = f"[{', '.join(where)}] " if where else ""
        # one line whatever the message quotes (file names, ids, tool output): control characters escaped
        return escape(prefix + " ".join(self.message.split()), 4000)


class InputError(Gho2KvmError):
    """The user's input (config, source image, .reg file) is not acceptable."""


class ToolError(Gho2KvmError):
    """An external program failed; carries its argv (redacted), exit code and stderr."""

    def __init__(
        self,
        message: str,
        *,
        tool: str,
        argv: list[str],
        returncode: int | None,
        stderr: str = "",
        stdout: str = "",
        image_id: str | None = None,
        step: str | None = None,
    ) -> None:
        self.tool = tool
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        super().__init__(message, image_id=image_id, step=step)


class TransientError(Gho2KvmError):
    """A failure worth retrying later (e.g. libvirt daemon unreachable)."""

    transient = True


def plain_error(e: BaseException) -> str:
    """One line for an exception that is not one of ours, in words a person reads: an OSError names
    its file and what the system said (``/x/y: No space left on device``), never a Python class name."""
    import errno as _errno

    if isinstance(e, OSError):
        what = e.strerror or (str(e) if not e.errno else _errno.errorcode.get(e.errno, "")) or "error"
        files = " → ".join(str(f) for f in (e.filename, e.filename2) if f)
        return escape(f"{files}: {what}" if files else what, 4000)
    # not a failure of the input or the system: a defect, named as such (its class tells the developer)
    return escape(f"{type(e).__name__}: {' '.join(as_text(e).split())}", 4000)
