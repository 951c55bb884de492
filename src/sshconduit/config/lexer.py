"""The line syntax sshd_config(5) and ssh_config(5) share: keywords, quoting, comments, times and flags."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError


class LineError(Exception):
    """A bad value; the caller adds "file: line N: " in front."""


@dataclass(frozen=True)
class ConfigLine:
    source: str
    lineno: int
    keyword: str  # as written
    args: list[str]  # quotes removed, trailing comment dropped
    rest: str  # the raw text after the keyword, for ForceCommand & co.

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: line {self.lineno}: {message}")


_KEYWORD = re.compile(r"[ \t]*([^ \t=]+)[ \t]*=?[ \t]*")


def read_config_lines(text: str, source: str, first_line: int = 1) -> list[ConfigLine]:
    """``Keyword value``, ``Keyword=value``, ``#`` comments, quoted arguments, as OpenSSH reads them."""
    lines: list[ConfigLine] = []
    for lineno, raw in enumerate(text.splitlines(), start=first_line):
        stripped = raw.strip(" \t\r\n\f\v")
        if not stripped or stripped.startswith("#"):
            continue
        match = _KEYWORD.match(stripped)
        if match is None:
            continue
        rest = stripped[match.end() :]
        try:
            args = split_arguments(rest)
        except ValueError:
            raise ConfigError(f"{source}: line {lineno}: invalid quotes") from None
        lines.append(ConfigLine(source, lineno, match.group(1), args, rest.strip()))
    return lines


def split_arguments(text: str) -> list[str]:
    """Whitespace-separated words; ' and " group, a backslash escapes a quote, a backslash or a space,
    an unquoted # starting a word ends the line. ValueError on an unterminated quote."""
    args: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == "#":
            break
        word: list[str] = []
        quote = ""
        while i < n:
            c = text[i]
            if c == "\\" and i + 1 < n and (text[i + 1] in "'\"\\" or (not quote and text[i + 1] == " ")):
                word.append(text[i + 1])
                i += 2
                continue
            if not quote and c in " \t":
                break
            if not quote and c in "'\"":
                quote = c
            elif quote and c == quote:
                quote = ""
            else:
                word.append(c)
            i += 1
        if quote:
            raise ValueError("unterminated quote")
        args.append("".join(word))
    return args


_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str) -> int | None:
    """sshd's time format: ``90``, ``2m``, ``1h30m``, ``1w``; None when malformed."""
    if not re.fullmatch(r"(?:[0-9]+[smhdwSMHDW]?)+", text):
        return None
    return sum(int(n) * _TIME_UNITS[unit.lower()] for n, unit in re.findall(r"([0-9]+)([a-zA-Z]?)", text))


def parse_rekey_limit(args: list[str], bad_number: str = "Bad number") -> tuple[int | None, int | None]:
    """RekeyLimit's ``size [time]``, as ssh and sshd read it: bytes, None for ``default``; seconds, None when not
    given or ``none`` (no limit, or in an sshd Match block the main section's). Raises LineError in their words
    (sshd's ``bad_number`` is "Bad RekeyLimit number")."""
    if not 1 <= len(args) <= 2:
        raise LineError("Missing argument." if not args else "keyword RekeyLimit extra arguments at end of line")
    size: int | None = None
    if args[0].lower() != "default":
        found = re.fullmatch(r"([0-9]+)([KMGkmg]?)", args[0])
        if found is None:
            raise LineError(f"{bad_number} '{args[0]}': Invalid argument")
        size = int(found.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[found.group(2).lower()]
        if size < 16:
            raise LineError("RekeyLimit too small")
    seconds: int | None = None
    if len(args) == 2 and args[1].lower() != "none":
        seconds = parse_time(args[1])
        if seconds is None:
            raise LineError("invalid time value.")
    return size, seconds


def parse_flag(text: str, *, true_false: bool = False) -> bool | None:
    """yes/no (and true/false where ssh accepts them); None when neither."""
    lowered = text.lower()
    if lowered == "yes" or (true_false and lowered == "true"):
        return True
    if lowered == "no" or (true_false and lowered == "false"):
        return False
    return None
