"""The collection tdxvirt.tdx passes ansible-test sanity's tests that run offline, and
the checks of those that cannot (validate-modules, ansible-doc: their virtual
environments bootstrap pip from the network) that matter most are made here: every
module's DOCUMENTATION names exactly its argument_spec's options with their types,
defaults, choices and elements, and ansible-doc renders it."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COLLECTION = REPO / "ansible_collections/tdxvirt/tdx"
MODULES = sorted(p.stem for p in (COLLECTION / "plugins/modules").glob("tdx_*.py"))
BIN = Path(sys.executable).parent
# ansible-test sanity's tests that need no virtual environment of their own
OFFLINE = ("action-plugin-docs", "changelog", "compile", "empty-init", "ignores", "line-endings",
           "no-assert", "no-get-exception", "no-illegal-filenames", "no-smart-quotes",
           "replace-urlopen", "shebang", "symlinks", "use-argspec-type-path", "use-compat-six")


def test_every_module_the_issue_names_is_there():
    assert MODULES == ["tdx_attest", "tdx_facts", "tdx_gpu", "tdx_host", "tdx_td"]


def test_ansible_test_sanity_offline_subset_passes(tmp_path):
    output = COLLECTION / "tests/output"
    existed = output.exists()
    try:
        done = subprocess.run([str(BIN / "ansible-test"), "sanity", "--python",
                               f"{sys.version_info.major}.{sys.version_info.minor}",
                               *(arg for test in OFFLINE for arg in ("--test", test))],
                              cwd=COLLECTION, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(tmp_path)}, check=False)
    finally:
        if not existed:
            shutil.rmtree(COLLECTION / "tests", ignore_errors=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for test in OFFLINE:
        assert f'Running sanity test "{test}"' in done.stdout + done.stderr


class _Spec(Exception):
    pass


def _argument_spec(name: str, monkeypatch) -> dict:
    """The module's AnsibleModule(...) arguments, captured as main() makes them."""
    monkeypatch.syspath_prepend(str(REPO))
    module = importlib.import_module(f"ansible_collections.tdxvirt.tdx.plugins.modules.{name}")

    def capture(**kwargs):
        raise _Spec(kwargs)

    monkeypatch.setattr(module, "AnsibleModule", capture)
    with pytest.raises(_Spec) as caught:
        module.main()
    return caught.value.args[0], module


def _fragment_options(doc: dict) -> dict:
    """The options of the collection's doc fragments the module extends."""
    options = {}
    for fragment in doc.get("extends_documentation_fragment", []):
        assert fragment.startswith("tdxvirt.tdx."), fragment
        source = importlib.import_module("ansible_collections.tdxvirt.tdx.plugins.doc_fragments."
                                         + fragment.rsplit(".", 1)[1])
        options.update(yaml.safe_load(source.ModuleDocFragment.DOCUMENTATION)["options"])
    return options


@pytest.mark.parametrize("name", MODULES)
def test_documentation_matches_the_argument_spec(name, monkeypatch):
    kwargs, module = _argument_spec(name, monkeypatch)
    assert kwargs["supports_check_mode"] is True
    spec = kwargs["argument_spec"]
    doc = yaml.safe_load(module.DOCUMENTATION)
    assert doc["module"] == name and doc["short_description"] and doc["description"]
    options = {**_fragment_options(doc), **doc["options"]}  # the module's own win, as in Ansible
    assert sorted(options) == sorted(spec)
    for option, arg in spec.items():
        documented = options[option]
        assert documented["description"], option
        assert documented["type"] == arg["type"], option
        assert documented.get("default") == arg.get("default"), option
        assert documented.get("choices") == arg.get("choices"), option
        assert documented.get("elements") == arg.get("elements"), option
        assert documented.get("required", False) == arg.get("required", False), option
    assert yaml.safe_load(module.EXAMPLES)
    returned = yaml.safe_load(module.RETURN)
    assert all(value["description"] and value["returned"] and value["type"]
               for value in returned.values())


@pytest.mark.parametrize("name", MODULES)
def test_ansible_doc_renders_every_module(name, tmp_path):
    done = subprocess.run([str(BIN / "ansible-doc"), "-j", f"tdxvirt.tdx.{name}"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(REPO),
                               "ANSIBLE_HOME": str(tmp_path), "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    rendered = json.loads(done.stdout)[f"tdxvirt.tdx.{name}"]
    assert rendered["doc"]["module"] == name and rendered["examples"] and rendered["return"]
