"""Imports point one way: no module imports one of a layer above its own.

The layers, lowest first (docs/architecture.md):
0. base: errors, units, PCI addresses, paths, terminal-safe text, user files, the
   kernel-config parser, the trust walk, locks, the config file, the build record,
   first-boot inputs
1. this machine and libvirt: this machine's files (tdxvirt.host), its GPUs' binding,
   groups and CC modes (tdxvirt.gpu but `gpu list`), libvirt access (tdxvirt.virt)
2. the domain (tdxvirt.domain): spec, policy, the XML written and read, its rules,
   measurements, which of its files tdxvirt may delete
3. host facts: local or through libvirt, one interface (tdxvirt.facts)
4. features: host changes and checks, the guest, builds, attestation, the simulated
   host, the journal of interrupted changes (host check reports it)
5. operations on TDs (tdxvirt.lifecycle), and `gpu list`
6. the command line (tdxvirt.cli)

Every import counts, also those inside functions (tdxvirt imports lazily for speed).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tdxvirt"

LAYERS = {
    0: ["errors", "units", "pci", "paths", "textsafe", "userfile", "kconfig", "host.trust", "cache",
        "locks", "config", "filedigest", "build.artifacts", "build.install_record", "build.jsonrecord",
        "guest.userdata",
        "guest.seed",
        "guest", "build", "attest"],  # the last three: the packages' own error classes
    1: ["host", "virt", "gpu"],
    2: ["domain"],
    3: ["facts"],
    4: ["hostcfg", "doctor", "guest.checks", "guest.verify", "guest.console_tail", "build.actions", "build.distro",
        "build.edk2", "build.gitops", "build.kconfig", "build.manifest", "build.progress",
        "build.runner", "build.stamps", "build.steps", "build.source", "build.subprojects",
        "build.prereqs", "build.install", "attest.quote", "attest.checks",
        "attest.dcap", "attest.evidence", "attest.report", "sim", "enforce",
        "lifecycle.journal"],  # intents: host check reports them
    5: ["lifecycle", "gpu.discovery"],
    6: ["cli"],
}
_LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def layer_of(module: str) -> int:
    """The layer of ``tdxvirt.a.b.c``: its longest listed prefix (a package's modules
    inherit the package's layer unless listed themselves)."""
    parts = module.split(".")[1:]
    if not parts:
        return 0  # tdxvirt itself: its version
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in _LAYER_OF:
            return _LAYER_OF[name]
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py LAYERS")


def _module_of(path: Path) -> tuple[str, str]:
    """(module, its package) of a file below tdxvirt/."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), ".".join(parts[:-1])
    return ".".join(parts), ".".join(parts[:-1])


def imports() -> list[tuple[str, str, int]]:
    """(importer, imported tdxvirt module, line) for every import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, package = _module_of(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("tdxvirt"):
                    continue
                named = [f"{target}.{a.name}" for a in node.names]
                submodules = [n for n in named if _is_module(n)]
                for imported in submodules or [target]:
                    found.append((module, imported, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(module, a.name, node.lineno) for a in node.names
                          if a.name.startswith("tdxvirt")]
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").exists() or \
        (PACKAGE.parent / relative / "__init__.py").exists()


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(_module_of(path)[0])


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{importer} (layer {layer_of(importer)}) imports {imported} (layer "
              f"{layer_of(imported)}) at line {line}"
              for importer, imported, line in imports()
              if imported != "tdxvirt" and layer_of(imported) > layer_of(importer)]
    assert upward == [], "\n".join(upward)
