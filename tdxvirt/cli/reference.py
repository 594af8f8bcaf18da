"""The command reference and man pages, generated from click's own help.

Generated, never hand-written, so they cannot drift from the commands: tests compare
the checked-in files with a fresh generation. ``python -m tdxvirt.cli.reference DIR``
writes ``DIR/commands.md`` and ``DIR/man/tdxvirt*.1``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

WIDTH = 80  # fixed, so the output does not depend on the terminal that generates it


def _walk(command: click.Command, path: tuple[str, ...], parent: click.Context | None):
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    ctx = click.Context(command, info_name=path[-1], parent=parent, **settings)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            yield from _walk(command.get_command(ctx, name), (*path, name), ctx)


def commands():
    """(path, command, help text) of tdxvirt and every subcommand, in order."""
    from . import main

    for path, command, ctx in _walk(main, ("tdxvirt",), None):
        yield path, command, command.get_help(ctx)


def markdown() -> str:
    parts = ["# Command reference", "",
             "Generated from the commands' own `--help` by `scripts/gen-docs`; do not edit.", ""]
    for path, _, text in commands():
        parts += [f"## `{' '.join(path)}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(parts)


def _roff(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = line.replace("\\", "\\e")
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _summary(command: click.Command) -> str:
    """The first sentence of the help, whole (man's NAME line is never cut)."""
    text = (command.help or command.short_help or "").strip().split("\n\n")[0]
    first = " ".join(text.split()).split(". ")[0].rstrip(".")
    return first.replace("\\", "\\e")


def _items(pairs) -> list[str]:
    lines = []
    for term, meaning in pairs:
        lines += [".TP", f"\\fB{_roff(term)}\\fR", _roff(meaning)]
    return lines


def man_pages(version: str) -> dict[str, str]:
    from .manpage_sections import ENVIRONMENT, EXAMPLES, EXIT_STATUS, FILES

    listed = list(commands())
    pages = {}
    for path, command, text in listed:
        name = "-".join(path)
        key = " ".join(path)
        examples = []
        for what, example in EXAMPLES.get(key, ()):
            examples += [".PP", _roff(what) + ":", ".RS", ".nf", _roff(example), ".fi", ".RE"]
        below = [f"{'-'.join(p)}(1)" for p, _, _ in listed
                 if len(p) == len(path) + 1 and p[:len(path)] == path]
        above = [f"{'-'.join(path[:i])}(1)" for i in range(1, len(path))]
        see_also = ", ".join([*below, *above, "virsh(1)", "virt-install(1)", "virt-xml(1)"])
        pages[f"{name}.1"] = "\n".join([
            f'.TH "{name.upper()}" 1 "" "tdxvirt {version}" "tdxvirt manual"',
            ".SH NAME", f"{name} \\- {_summary(command)}",
            ".SH DESCRIPTION", ".nf", _roff(text.rstrip()), ".fi",
            *([".SH EXAMPLES", *examples] if examples else []),
            ".SH EXIT STATUS", *_items(EXIT_STATUS),
            ".SH ENVIRONMENT", *_items(ENVIRONMENT),
            ".SH FILES", *_items(FILES),
            ".SH SEE ALSO", see_also, ""])
    return pages


def write(directory: Path) -> list[Path]:
    from importlib.metadata import version

    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "commands.md"]
    written[0].write_text(markdown())
    man = directory / "man"
    man.mkdir(exist_ok=True)
    for stale in man.glob("*.1"):
        stale.unlink()
    for name, text in man_pages(version("tdxvirt")).items():
        (man / name).write_text(text)
        written.append(man / name)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(path)
