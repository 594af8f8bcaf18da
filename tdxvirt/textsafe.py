"""Text from libvirt, domain XML, sysfs or a guest, made safe to print on a terminal.

libvirt accepts almost any character in a domain name and in metadata (CR, ESC, the
C1 CSI U+009B, bidi overrides such as U+202E); a guest's agent returns whatever the
guest prints. Written raw, such text moves the cursor, recolours or rewrites earlier
lines, reorders what follows it, or forges extra table rows. ``safe`` shows every
control and format character (Unicode categories Cc and Cf), line and paragraph
separators (Zl, Zp), lone surrogates (Cs) and the backslash itself as a Python-style
escape (``\\x1b``, ``\\u202e``, ``\\\\``), so the result is one line that reads back
unambiguously. Text and table output goes through it; JSON does not need it
(json.dumps escapes control characters, and with its default ensure_ascii every
non-ASCII character).
"""

from __future__ import annotations

import unicodedata

_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# A guest value longer than this is cut (guest verify): a guest must not flood the terminal.
GUEST_TEXT_LIMIT = 200


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def needs_escape(char: str) -> bool:
    return char == "\\" or unicodedata.category(char) in _ESCAPED_CATEGORIES


def safe(value) -> str:
    """``value`` as text with nothing a terminal would act on (None and other objects
    are converted with str first)."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case, without a per-character walk
    return "".join(_escape(c) if needs_escape(c) else c for c in text)


def quoted(value) -> str:
    """``safe(value)`` in single quotes, as messages quote names: 'td-1'."""
    return f"'{safe(value)}'"


def cap(text: str, limit: int = GUEST_TEXT_LIMIT) -> str:
    """At most ``limit`` characters of ``text``; a cut is marked with how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters cut)"


def guest_text(text: str, limit: int = GUEST_TEXT_LIMIT) -> str:
    """Guest-reported text, capped (escaping is left to the printer: JSON needs none)."""
    return cap(text, limit)


def _number(cell) -> bool:
    return isinstance(cell, (int, float)) and not isinstance(cell, bool)


def row(cells) -> list:
    """A table row with every cell made safe (numbers stay numbers for alignment)."""
    return [c if _number(c) else safe(c) for c in cells]


def table(rows, headers) -> str:
    """tabulate's plain table of ``rows``, every text cell escaped and shown as given:
    numeric parsing stays off for text columns, so a name such as '1.50' or '1e5' is
    never reformatted as a number."""
    from tabulate import tabulate

    rows = [row(cells) for cells in rows]
    text_columns = [i for i in range(len(headers))
                    if not rows or not all(_number(r[i]) for r in rows if i < len(r))]
    return tabulate(rows, headers=[safe(h) for h in headers], disable_numparse=text_columns)


# Characters XML 1.0 cannot hold (C0 controls but TAB, LF, CR; surrogates; U+FFFE/U+FFFF).
# libvirt writes some of them raw into a domain's XML (virDomainRename accepts ESC in a
# name), and lxml then refuses the whole document.
_XML_ILLEGAL = None


def xml_parsable(xml: str) -> str:
    """``xml`` with every character XML 1.0 forbids replaced by U+FFFD, so one hostile
    domain cannot make lxml (and with it `list`, `define`, `gpu list`) fail for all.
    Unchanged when there is none (the usual case)."""
    import re

    global _XML_ILLEGAL
    if _XML_ILLEGAL is None:
        _XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
    return _XML_ILLEGAL.sub("\ufffd", xml)


def terminal_lines(text: str) -> str:
    """Multi-line text (a domain's XML) for a terminal: each line made safe, the line
    breaks kept."""
    return "\n".join(safe(line) for line in text.split("\n"))
