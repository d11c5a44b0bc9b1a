"""The guestfish session wrapper without an appliance (fast tier): a ``guestfish --listen`` server with
no drive answers builtins and fails appliance commands, which is all these tests need."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.core.errors import ToolError
from pipeline.tools.guestfs import Guestfish, _guestfish_pid
from pipeline.tools.run import process_start, start_daemon


@pytest.fixture
def server() -> Iterator[Guestfish]:
    g = Guestfish([], image_id="img", step="inspect")
    g.pid = start_daemon(["guestfish", "--listen"], step="inspect", image_id="img", log=g.errlog,
                         pid_from=_guestfish_pid)
    g._wait_for_server()
    pid = g.pid
    try:
        yield g
    finally:
        g.close()
    assert process_start(pid) is None  # closed: the server is gone


def test_batch_gives_each_command_its_own_output(server: Guestfish) -> None:
    assert server.batch(("echo", "a"), ("echo", "b  c"), ("echo",), ("get-verbose",)) == \
        ["a\n", "b  c\n", "\n", "false\n"]
    assert server("echo", "one") == "one\n"
    assert server.batch() == []
    assert server.lines("echo", "x") == ["x"]


def test_a_failing_command_is_one_line_and_the_appliance_lives_on(server: Guestfish) -> None:
    """A failure the caller handles (``part-get-parttype`` of a disk without a partition table) must
    not end the session: guestfish's server exits on a failed command unless told otherwise."""
    for attempt in range(2):
        with pytest.raises(ToolError) as ei:
            server("list-devices")  # needs a launched appliance: fails
        msg = str(ei.value)
        assert msg.startswith("[image img, step inspect] guestfish list-devices failed: ") and "\n" not in msg
        assert "call launch before using this function" in msg, msg
        assert server("echo", f"still here {attempt}") == f"still here {attempt}\n"


def test_a_failure_inside_a_batch_names_the_command(server: Guestfish) -> None:
    with pytest.raises(ToolError) as ei:
        server.batch(("echo", "before"), ("list-devices",), ("echo", "after"))
    assert "guestfish list-devices failed: " in str(ei.value)
    with pytest.raises(ToolError) as ei:
        server("no-such-command")
    assert "guestfish no-such-command failed: " in str(ei.value) and "unknown command" in str(ei.value)
    assert server("echo", "alive") == "alive\n"


def test_an_unchecked_batch_gives_no_output_for_a_failed_query(server: Guestfish) -> None:
    """``check=False``: the queries that worked give their output, the failed one nothing; nothing
    raised, and the server still answers."""
    assert server.batch(("echo", "a"), ("list-devices",), ("echo", "b"), check=False) == ["a\n", "", "b\n"]
    assert server("echo", "alive") == "alive\n"
