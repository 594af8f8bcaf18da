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
