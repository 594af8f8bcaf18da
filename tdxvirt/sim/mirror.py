"""The Debian mirror this machine's apt already uses, for the simulated host's roots.

Read from apt's own sources (deb822 ``*.sources`` files and one-line ``sources.list``
entries), so a user's mirror or proxy is honoured and no registry's host name is
written into tdxvirt. The first enabled ``deb`` source of the Debian archive proper
(a suite with no ``-security``/``-updates``/``-backports`` suffix) wins.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SimulatorError

_NOT_THE_ARCHIVE = ("-security", "-updates", "-backports", "-proposed-updates")


def _main_archive(uri: str, suites: list[str]) -> bool:
    return bool(suites) and any(not suite.endswith(_NOT_THE_ARCHIVE) for suite in suites) \
        and not uri.rstrip("/").endswith("-security")


def _deb822(text: str):
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        for uri in fields.get("uris", "").split():
            yield uri, suites


def _one_line(text: str):
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            yield words[0], [words[1]]


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The URI of the Debian archive apt uses here; an error naming where it looked."""
    candidates = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        candidates += _deb822(path.read_text(errors="replace"))
    for path in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            candidates += _one_line(path.read_text(errors="replace"))
    for uri, suites in candidates:
        if "/debian" in uri and _main_archive(uri, suites):
            return uri
    raise SimulatorError(
        f"no Debian archive found in apt's sources under {apt_dir}; add the Debian mirror "
        "you use to /etc/apt/sources.list.d/ (a 'deb' source of suite bookworm or trixie)")
