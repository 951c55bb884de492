"""Log lines as OpenSSH writes them, and what an internal error (log.exception) adds to its line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest

from sshconduit.cli.logs import OpenSSHFormatter


@pytest.fixture
def root_level() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.level
    yield
    root.setLevel(saved)


def record(level: int, failed: bool) -> logging.LogRecord:
    """The record of ``log.exception(...)`` (``failed``) or of a plain log call."""
    try:
        raise KeyError("channel 3")
    except KeyError:
        exc_info = sys.exc_info() if failed else None
    return logging.getLogger("sshconduit").makeRecord(
        "sshconduit", level, __file__, 1, "channel %d: error opening %s", (3, "x"), exc_info
    )


def test_an_internal_error_names_its_exception_on_the_same_line(root_level: None) -> None:
    logging.getLogger().setLevel(logging.INFO)
    text = OpenSSHFormatter("conduitd").format(record(logging.ERROR, failed=True))
    assert text == "conduitd: channel 3: error opening x: KeyError: 'channel 3'"


def test_debugging_shows_the_traceback(root_level: None) -> None:
    logging.getLogger().setLevel(logging.DEBUG)
    text = OpenSSHFormatter("conduitd").format(record(logging.ERROR, failed=True))
    first, *rest = text.splitlines()
    assert first == "conduitd: channel 3: error opening x"
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "KeyError: 'channel 3'"


def test_a_plain_line_is_unchanged(root_level: None) -> None:
    logging.getLogger().setLevel(logging.DEBUG)
    assert (
        OpenSSHFormatter("conduitd").format(record(logging.ERROR, failed=False))
        == "conduitd: channel 3: error opening x"
    )
    assert OpenSSHFormatter().format(record(logging.DEBUG, failed=False)) == "debug1: channel 3: error opening x"
