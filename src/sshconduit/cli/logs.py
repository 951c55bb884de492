"""Log output for both commands: OpenSSH-style lines (``debug1: ...``) on stderr, or syslog for the daemon."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

_LEVEL_PREFIX = {logging.DEBUG: "debug1: ", logging.INFO: "", logging.WARNING: "", logging.ERROR: ""}


class OpenSSHFormatter(logging.Formatter):
    def __init__(self, program: str | None = None) -> None:
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            # An internal error (log.exception): name the exception on the line, and show where it came from
            # when debugging (-d, -v, LogLevel DEBUG); a normal log stays one line per event, as OpenSSH's.
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                text += "\n" + self.formatException(record.exc_info)
            else:
                exc = record.exc_info[1]
                text += f": {type(exc).__name__}: {exc}" if str(exc) else f": {type(exc).__name__}"
        prefix = _LEVEL_PREFIX.get(record.levelno, "")
        name = f"{self.program}: " if self.program and record.levelno >= logging.ERROR else ""
        return f"{prefix}{name}{text}"


def verbosity_level(verbose: int, quiet: bool = False) -> int:
    if quiet:
        return logging.CRITICAL
    return logging.DEBUG if verbose else logging.WARNING


def setup_logging(level: int, *, program: str | None = None, syslog: bool = False, logfile: str | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile)
    elif syslog and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log", facility=logging.handlers.SysLogHandler.LOG_AUTH)
        handler.ident = f"{program or 'conduitd'}[{os.getpid()}]: "
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OpenSSHFormatter(program))
    root.addHandler(handler)
    root.setLevel(level)
