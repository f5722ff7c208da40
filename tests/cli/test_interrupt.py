"""A Ctrl-C that a library swallowed on its way up still ends the command as interrupted (exit 130)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import pytest

from cli import app as cli_app
from cli import main as cli_main
from core import interrupt


@pytest.fixture
def restore_sigint() -> Iterator[None]:
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)
    interrupt._REQUESTED.clear()


def test_a_swallowed_interrupt_exits_130(restore_sigint: None, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A command whose Ctrl-C a library swallowed ends the way Typer ends every command, with SystemExit(0)."""
    @cli_app.app.command("swallow-ctrl-c", hidden=True)
    def swallow() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            signal.pthread_sigmask(signal.SIG_BLOCK, [])
        except KeyboardInterrupt:
            pass

    try:
        monkeypatch.setattr(sys, "argv", ["anchor", "swallow-ctrl-c"])
        with pytest.raises(SystemExit) as ended:
            cli_main.main()
    finally:
        cli_app.app.registered_commands[:] = [c for c in cli_app.app.registered_commands
                                              if c.name != "swallow-ctrl-c"]
    assert ended.value.code == 130
    assert "interrupted: completed stages are kept" in capsys.readouterr().err
