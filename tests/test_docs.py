"""The command reference and man pages are generated from click, and kept current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_checked_in_reference_and_man_pages_are_current(tmp_path):
    # In a process of its own, as scripts/gen-docs runs: click caches each command's help
    # option from the first context that asks, and tests invoke sub-groups directly.
    done = subprocess.run([sys.executable, "-m", "tdxvirt.cli.reference", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    fresh = [Path(line) for line in done.stdout.split()]
    for path in fresh:
        checked_in = REPO / "docs" / path.relative_to(tmp_path)
        assert checked_in.exists() and checked_in.read_text() == path.read_text(), \
            f"{checked_in.relative_to(REPO)} is stale: run scripts/gen-docs"
    assert sorted(p.name for p in (REPO / "docs/man").glob("*.1")) == \
        sorted(p.name for p in fresh if p.suffix == ".1")


def test_every_man_page_renders(tmp_path):
    for page in (REPO / "docs/man").glob("*.1"):
        done = subprocess.run(["groff", "-man", "-Tutf8", "-z", "-ww", str(page)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0 and not done.stderr, (page.name, done.stderr)


def test_readme_is_the_users_page_and_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 10_000
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / target).exists(), target


def test_man_pages_have_the_sections_users_look_for():
    """NAME whole (not cut at 70 characters), EXIT STATUS, ENVIRONMENT, FILES, and a
    SEE ALSO that leads from a group to each of its commands' pages."""
    pages = {p.name: p.read_text() for p in (REPO / "docs/man").glob("*.1")}
    for name, text in pages.items():
        for section in ("NAME", "DESCRIPTION", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
            assert f".SH {section}\n" in text, (name, section)
        title = text.split(".SH NAME\n", 1)[1].split("\n", 1)[0]
        assert "..." not in title and not title.endswith("\\-"), (name, title)
    see_also = pages["tdxvirt.1"].split(".SH SEE ALSO\n", 1)[1]
    direct = {n[:-2] for n in pages if n.count("-") == 1}
    assert all(f"{page}(1)" in see_also for page in direct), direct
    assert "tdxvirt-gpu-detach(1)" in pages["tdxvirt-gpu.1"].split(".SH SEE ALSO\n", 1)[1]


def test_man_page_examples_use_only_options_their_command_has():
    import shlex

    from tdxvirt.cli.manpage_sections import EXAMPLES
    from tdxvirt.cli.reference import commands

    found = {" ".join(path): command for path, command, _ in commands()}
    everywhere = {o for p in found["tdxvirt"].params for o in p.opts}
    for key, examples in EXAMPLES.items():
        command = found[key]
        known = everywhere | {o for p in command.params for o in getattr(p, "opts", [])}
        for _, example in examples:
            for line in example.split("&&"):
                words = shlex.split(line)
                assert " ".join(w for w in words if not w.startswith("-"))\
                    .startswith(key.split()[0]), example
                options = {w.split("=")[0] for w in words if w.startswith("--") and w != "--"}
                assert options <= known | {"--help"}, (key, options - known)


def test_in_page_links_of_the_docs_lead_to_a_heading():
    """An index by task is only useful while its anchors exist (GitHub's heading slugs)."""
    def slug(heading: str) -> str:
        return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")

    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        text = page.read_text()
        anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
        for anchor in re.findall(r"\]\(#([^)]+)\)", text):
            assert anchor in anchors, (page.name, anchor)
