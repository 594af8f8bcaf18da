"""What pip installs is the whole of tdxvirt: every package below tdxvirt/ is listed in
pyproject.toml (setuptools installs only the listed ones; a missing tdxvirt.enforce made
an installed hook refuse every TD start, as it cannot load its check)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_is_installed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "tdxvirt").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == {"tdxvirt.domains"}  # the templates' folder, domains/
