"""The simulated host's roots come from the Debian mirror apt already uses here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tdxvirt.errors import SimulatorError
from tdxvirt.sim.mirror import debian_mirror

REPO = Path(__file__).resolve().parent.parent


def apt_dir(tmp_path, sources_list: str = "", **sources: str) -> Path:
    (tmp_path / "sources.list.d").mkdir(parents=True)
    (tmp_path / "sources.list").write_text(sources_list)
    for name, text in sources.items():
        (tmp_path / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return tmp_path


def test_deb822_sources_give_the_archive_not_security(tmp_path):
    apt = apt_dir(tmp_path, debian_sources="""Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
""")
    assert debian_mirror(apt) == "http://mirror.example/debian"


def test_one_line_sources_with_options_and_disabled_stanzas(tmp_path):
    apt = apt_dir(tmp_path, "deb [arch=amd64 signed-by=/k.gpg] http://proxy.local:3142/debian trixie main\n",
                  old_sources="Types: deb\nEnabled: no\nURIs: http://other/debian\nSuites: trixie\n")
    assert debian_mirror(apt) == "http://proxy.local:3142/debian"


def test_no_debian_source_is_one_clear_error(tmp_path):
    apt = apt_dir(tmp_path, "deb http://example/ubuntu noble main\n")
    with pytest.raises(SimulatorError, match="no Debian archive found in apt's sources"):
        debian_mirror(apt)


def test_this_machines_own_apt_names_a_mirror():
    assert debian_mirror().startswith(("http://", "https://"))


def test_no_package_registry_host_is_written_in_the_repository():
    # joined here, so this file does not name them either
    names = tuple(".".join(parts) for parts in (
        ("deb", "debian", "org"), ("security", "debian", "org"), ("pypi", "org"),
        ("files", "pythonhosted", "org"), ("registry", "npmjs", "org")))
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    hits = [f"{path}: {name}" for path in tracked if (REPO / path).is_file()
            for name in names if name in (REPO / path).read_text(errors="replace")]
    assert hits == []
