"""libvirt's qemu.conf, read and edited byte for byte.

The format is libvirt's own (src/util/virconf.c): ``name = value`` where a value is a
string in double or single quotes (or Python-style triple double quotes, which may
span lines), an integer, or a ``[ list ]`` of those that may span lines; ``#`` starts
a comment; a statement may end with ``;``. libvirt's strings have no escapes, so a
value holding a quote or a line break cannot be written at all.

Editing keeps every byte except the value being changed: an active setting has only
its value replaced; otherwise the commented default (``#user = "libvirt-qemu"``) is
replaced in place by the setting; only a setting the file does not mention at all is
appended. Malformed input (an unterminated string or list, a setting given twice) is
refused naming the line, before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import HostNotReadyError, InputError

PATH = "/etc/libvirt/qemu.conf"

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[+-]?[0-9]+")
_BLANK = " \t"
_EOL = "\r\n"

Value = str | int | list


class QemuConfSyntaxError(HostNotReadyError):
    """qemu.conf does not parse; nothing was written."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: Value
    line: int  # 1-based line of the name
    start: int  # offset of the value's first character
    end: int  # offset just past the value


@dataclass(frozen=True)
class CommentLine:
    line: int
    start: int  # offset of '#'
    end: int  # offset of the line's end (its newline, or the end of the text)
    text: str


class _Scanner:
    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source
        self.pos = 0

    @property
    def line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def error(self, what: str, line: int | None = None) -> QemuConfSyntaxError:
        return QemuConfSyntaxError(
            f"{self.source} line {line or self.line}: {what}; fix the file by hand "
            "(tdxvirt changed nothing)"
        )

    def peek(self, count: int = 1) -> str:
        return self.text[self.pos:self.pos + count]

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_blanks(self) -> None:
        while not self.at_end() and self.text[self.pos] in _BLANK:
            self.pos += 1

    def skip_to_eol(self) -> None:
        while not self.at_end() and self.text[self.pos] not in _EOL:
            self.pos += 1

    def skip_list_space(self) -> None:
        """Blanks, line ends and comments, all allowed between list items."""
        while not self.at_end():
            char = self.text[self.pos]
            if char in _BLANK or char in _EOL:
                self.pos += 1
            elif char == "#":
                self.skip_to_eol()
            else:
                return

    def string(self) -> str:
        start_line = self.line
        if self.peek(3) == '"""':
            close = self.text.find('"""', self.pos + 3)
            if close < 0:
                raise self.error("unterminated string (\"\"\" never closed)", start_line)
            value = self.text[self.pos + 3:close]
            self.pos = close + 3
            return value
        quote = self.text[self.pos]
        self.pos += 1
        begin = self.pos
        while not self.at_end() and self.text[self.pos] != quote:
            if self.text[self.pos] in _EOL:
                break
            self.pos += 1
        if self.at_end() or self.text[self.pos] != quote:
            raise self.error(f"unterminated string (no closing {quote} on the line)",
                             start_line)
        value = self.text[begin:self.pos]
        self.pos += 1
        return value

    def scalar(self, key: str) -> str | int:
        char = self.peek()
        if char in ('"', "'"):
            return self.string()
        match = _NUMBER.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            return int(match.group())
        found = self.text[self.pos:].split("\n", 1)[0].strip()[:20] or "nothing"
        raise self.error(f"'{key}' has no valid value (found {found!r}; expected a quoted "
                         "string, a number or a [ list ])")

    def value(self, key: str) -> Value:
        if self.peek() != "[":
            return self.scalar(key)
        start_line = self.line
        self.pos += 1
        items: list = []
        self.skip_list_space()
        if self.peek() == "]":
            self.pos += 1
            return items
        while True:
            if self.at_end():
                raise self.error(f"unterminated list for '{key}' (no closing ])", start_line)
            items.append(self.scalar(key))
            self.skip_list_space()
            if self.peek() == ",":
                self.pos += 1
                self.skip_list_space()
                if self.peek() == "]":  # virconf allows a trailing comma
                    self.pos += 1
                    return items
                continue
            if self.peek() == "]":
                self.pos += 1
                return items
            if self.at_end():
                raise self.error(f"unterminated list for '{key}' (no closing ])", start_line)
            raise self.error(f"expected ',' or ']' in the list for '{key}'")


@dataclass(frozen=True)
class QemuConf:
    """A parsed qemu.conf: the text and where each setting and comment line sits."""

    text: str
    source: str
    entries: tuple[Entry, ...]
    comments: tuple[CommentLine, ...]

    @classmethod
    def parse(cls, data: bytes | str, source: str = PATH) -> "QemuConf":
        # surrogateescape: bytes that are not UTF-8 round-trip unchanged.
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        scan = _Scanner(text, source)
        entries: dict[str, Entry] = {}
        comments: list[CommentLine] = []
        while not scan.at_end():
            scan.skip_blanks()
            if scan.at_end():
                break
            char = scan.peek()
            if char in _EOL:
                scan.pos += 1
                continue
            if char == "#":
                line, start = scan.line, scan.pos
                scan.skip_to_eol()
                comments.append(CommentLine(line, start, scan.pos, text[start:scan.pos]))
                continue
            name = _NAME.match(text, scan.pos)
            if not name:
                found = text[scan.pos:].split("\n", 1)[0].strip()[:30]
                raise scan.error(f"expected a setting name, found {found!r}")
            key, line = name.group(), scan.line
            scan.pos = name.end()
            scan.skip_blanks()
            if scan.peek() != "=":
                raise scan.error(f"expected '=' after '{key}'")
            scan.pos += 1
            scan.skip_blanks()
            start = scan.pos
            value = scan.value(key)
            end = scan.pos
            scan.skip_blanks()
            if scan.peek() == ";":
                scan.pos += 1
                scan.skip_blanks()
            if scan.peek() == "#":
                scan.skip_to_eol()
            if not scan.at_end() and scan.peek() not in _EOL:
                raise scan.error(f"unexpected text after the value of '{key}'")
            if key in entries:
                raise scan.error(f"'{key}' is set twice (also on line {entries[key].line}); "
                                 "remove one of them", line)
            entries[key] = Entry(key, value, line, start, end)
        return cls(text, source, tuple(entries.values()), tuple(comments))

    def entry(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)

    def get(self, key: str, default: Value | None = None) -> Value | None:
        found = self.entry(key)
        return default if found is None else found.value

    def commented_default(self, key: str) -> CommentLine | None:
        """The last ``#key = ...`` line (libvirt's documented default), if any.

        At most one blank after '#': the indented examples inside the explanations
        (``#       user = "qemu"   # A user named "qemu"``) are not defaults.
        """
        pattern = re.compile(rf"#[ \t]?{re.escape(key)}[ \t]*=")
        matches = [c for c in self.comments if pattern.match(c.text)]
        return matches[-1] if matches else None

    def encode(self) -> bytes:
        return self.text.encode("utf-8", "surrogateescape")


def format_value(key: str, value: Value) -> str:
    """A value as libvirt writes it: strings in double quotes, integers bare."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if any(c in value for c in '"\r\n') or not value:
            raise InputError(
                f"cannot write {key} = {value!r} to qemu.conf: libvirt's format has no "
                "escapes, so a value may not be empty or hold a double quote or line break"
            )
        return f'"{value}"'
    if isinstance(value, list):
        return "[ " + ", ".join(format_value(key, item) for item in value) + " ]"
    raise InputError(f"cannot write {key} = {value!r} to qemu.conf: unsupported type")


def _same(current: Value | None, wanted: Value) -> bool:
    if isinstance(wanted, bool):
        wanted = int(wanted)
    return type(current) is type(wanted) and current == wanted


def set_values(conf: QemuConf, settings: dict[str, Value]) -> QemuConf:
    """The conf with each setting applied; an unchanged conf when all already hold."""
    edits: list[tuple[int, int, str]] = []
    appended: list[str] = []
    for key, wanted in settings.items():
        if not _NAME.fullmatch(key):
            raise InputError(f"invalid qemu.conf setting name {key!r}")
        rendered = format_value(key, wanted)
        entry = conf.entry(key)
        if entry is not None:
            if not _same(entry.value, wanted):
                edits.append((entry.start, entry.end, rendered))
            continue
        default = conf.commented_default(key)
        if default is not None:
            edits.append((default.start, default.end, f"{key} = {rendered}"))
        else:
            appended.append(f"{key} = {rendered}\n")
    text = conf.text
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    if appended:
        if text and not text.endswith("\n"):
            text += "\n"
        text += "".join(appended)
    if text == conf.text:
        return conf
    return QemuConf.parse(text, conf.source)


def edit(data: bytes, settings: dict[str, Value], source: str = PATH) -> bytes:
    """Bytes of qemu.conf with ``settings`` applied (raises before any change on bad input)."""
    return set_values(QemuConf.parse(data, source), settings).encode()
