"""run_cli: expected errors give one stderr line and exit status 2; bugs keep their traceback."""

import errno

import pytest

from itpn_d2.checkpoint import CheckpointError
from itpn_d2.errors import DEBUG_ENV, EXIT_USER_ERROR, UserError, run_cli


def _raise(error):
    def main():
        raise error
    return main


def test_user_error_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    status = run_cli(_raise(CheckpointError("x.pth does not fit:\n  missing: a, b\n")))
    assert status == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: x.pth does not fit:; missing: a, b\n"


def test_disk_full_is_named(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    status = run_cli(_raise(OSError(errno.ENOSPC, "No space left on device")))
    assert status == EXIT_USER_ERROR
    assert capsys.readouterr().err.startswith("error: no space left on device")


def test_bug_keeps_traceback_and_debug_reraises(monkeypatch):
    with pytest.raises(ZeroDivisionError):
        run_cli(_raise(ZeroDivisionError("bug")))
    with pytest.raises(OSError):
        run_cli(_raise(OSError(errno.EACCES, "Permission denied")))
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError):
        run_cli(_raise(UserError("shown with its traceback")))


def test_status_passes_through():
    assert run_cli(lambda: None) == 0
    assert run_cli(lambda: 3) == 3
