"""The manifests: the source document's reproduces Intel's instructions; bad ones are named.

The expected values below are copied from the source document (the "Device
Passthrough" build instructions): its clones, branches, mbox paths, kernel symbols,
QEMU configure line and build_ovmf.sh. That manifest ships as
``intel-device-passthrough``; the default (``upstream``) is tested in
test_build_upstream.py. The plans here pass ``--all``: they must not depend on what
the machine running the tests has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxvirt.build import edk2, steps
from tdxvirt.build import manifest as manifests
from tdxvirt.build.manifest import default_manifest_path, shipped_path
from tdxvirt.cli import TdxvirtGroup
from tdxvirt.cli.build import build
from tdxvirt.errors import InputError
from tdxvirt.host import HostRoot

DOC_TARGET_TXT = """ACTIVE_PLATFORM = OvmfPkg/OvmfPkgX64.dsc
TARGET = DEBUG
TARGET_ARCH = X64
TOOL_CHAIN_CONF = Conf/tools_def.txt
TOOL_CHAIN_TAG = GCC6
BUILD_RULE_CONF = Conf/build_rule.txt
MAX_CONCURRENT_THREAD_NUMBER = 4
"""


LEGACY = "intel-device-passthrough"


def test_the_source_documents_manifest_reproduces_it():
    loaded = manifests.load(LEGACY)
    assert loaded.path == str(shipped_path(LEGACY).resolve())
    assert loaded.path != str(default_manifest_path().resolve())
    tdx = loaded.repos["tdx-linux"]
    assert (tdx.url, tdx.ref) == ("https://github.com/intel/tdx-linux.git", "device-passthrough")
    kernel, qemu, ovmf = loaded.kernel, loaded.qemu, loaded.ovmf
    assert (kernel.repo.url, kernel.repo.ref) == (
        "https://git.kernel.org/pub/scm/linux/kernel/git/vishal/kvm.git", "kvm-coco-queue-20240512")
    assert [(p.repo, p.glob) for p in kernel.patches] == [("tdx-linux", "tdx-kvm/tdx_kvm_baseline_*.mbox")]
    assert kernel.config.enable == ("INTEL_TDX_HOST", "KVM", "KVM_INTEL", "TDX_GUEST_DRIVER", "HYPERV")
    assert kernel.config.disable == ("KEXEC", "CRASH_DUMP")
    assert kernel.config.module == ()
    assert (qemu.repo.url, qemu.repo.ref) == ("https://gitlab.com/qemu-project/qemu", "v9.1.0-rc0")
    assert [(p.repo, p.glob) for p in qemu.patches] == [("tdx-linux", "tdx-qemu/tdx_qemu_baseline_*.mbox")]
    assert qemu.configure == ("--enable-slirp", "--enable-kvm", "--target-list=x86_64-softmmu")
    assert (ovmf.repo.url, ovmf.repo.ref, ovmf.repo.submodules) == (
        "https://github.com/tianocore/edk2", "edk2-stable202405", True)
    assert (ovmf.platform, ovmf.target, ovmf.arch, ovmf.toolchain) == (
        "OvmfPkg/OvmfPkgX64.dsc", "DEBUG", "X64", "GCC6")
    assert edk2.target_txt(ovmf, 4) == DOC_TARGET_TXT


def _plan(workdir: Path, install=False, jobs=4):
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})
    args = ["build", "plan", "--workdir", str(workdir), "-j", str(jobs), "--json", "--manifest", LEGACY,
            "--all"]
    result = CliRunner().invoke(group, args + (["--install"] if install else []))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_source_documents_plan_matches_its_steps(tmp_path):
    w = tmp_path / "w"
    plan = _plan(w)
    assert [(s["component"], s["step"]) for s in plan["steps"]] == [
        ("tdx-linux", "fetch"),
        ("kernel", "fetch"), ("kernel", "patch"), ("kernel", "configure"), ("kernel", "build"),
        ("qemu", "fetch"), ("qemu", "patch"), ("qemu", "configure"), ("qemu", "build"),
        ("ovmf", "fetch"), ("ovmf", "configure"), ("ovmf", "build"),
    ]
    assert all(s["state"] == "todo" and not s["needs_root"] for s in plan["steps"])
    commands = {(s["component"], s["step"]): "\n".join(s["commands"]) for s in plan["steps"]}
    assert "remote add origin https://github.com/intel/tdx-linux.git" in commands["tdx-linux", "fetch"]
    assert "fetch origin device-passthrough" in commands["tdx-linux", "fetch"]
    assert "fetch origin kvm-coco-queue-20240512" in commands["kernel", "fetch"]
    assert f"am --empty=drop '{w}/src/tdx-linux/tdx-kvm/tdx_kvm_baseline_*.mbox'" in commands["kernel", "patch"]
    configure = commands["kernel", "configure"]
    assert ("scripts/config --file .config --enable INTEL_TDX_HOST --enable KVM --enable KVM_INTEL "
            "--enable TDX_GUEST_DRIVER --enable HYPERV --disable KEXEC --disable CRASH_DUMP") in configure
    assert configure.index("scripts/config") < configure.index("make olddefconfig") < configure.index("verify .config")
    assert "make -j4\n" in commands["kernel", "build"] + "\n"
    assert "make -j4 modules" in commands["kernel", "build"]
    assert "fetch origin v9.1.0-rc0" in commands["qemu", "fetch"]
    assert f"am --empty=drop '{w}/src/tdx-linux/tdx-qemu/tdx_qemu_baseline_*.mbox'" in commands["qemu", "patch"]
    assert commands["qemu", "configure"].endswith(
        "./configure --enable-slirp --enable-kvm --target-list=x86_64-softmmu")
    assert "make -j4" in commands["qemu", "build"]
    assert "fetch origin edk2-stable202405" in commands["ovmf", "fetch"]
    assert "submodule update --init" in commands["ovmf", "fetch"]
    ovmf = commands["ovmf", "configure"]
    assert "make -j4 -C BaseTools" in ovmf and ". ./edksetup.sh" in ovmf
    assert f"write {w}/src/ovmf/Conf/target.txt:\n" + "".join(
        f"    {line}\n" for line in DOC_TARGET_TXT.splitlines()) in ovmf + "\n"
    assert "defines TOOL_CHAIN_TAG GCC6" in ovmf
    assert "edksetup build -n 4" in commands["ovmf", "build"]
    # the OVMF image path comes from target + tag, never the document's DEBUG_GCC5
    assert plan["artifacts"]["ovmf OVMF.fd"].endswith("/DEBUG_GCC6/FV/OVMF.fd")
    assert "GCC5" not in json.dumps(plan)

    installing = _plan(w, install=True)
    extra = [(s["component"], s["step"], s["needs_root"]) for s in installing["steps"]
             if s["step"] == "install"]
    assert extra == [("kernel", "install", True), ("qemu", "install", True)]
    install_commands = "\n".join(c for s in installing["steps"] if s["step"] == "install" for c in s["commands"])
    assert "make modules_install" in install_commands and "make install" in install_commands
    assert not w.exists()


def test_one_component_plans_only_what_it_needs(tmp_path):
    loaded = manifests.load(LEGACY)
    assert [s.id for s in steps.plan(loaded, steps.select(loaded, "ovmf"), True)] == [
        "ovmf.fetch", "ovmf.configure", "ovmf.build"]
    assert [s.id for s in steps.plan(loaded, steps.select(loaded, "qemu"), False)] == [
        "tdx-linux.fetch", "qemu.fetch", "qemu.patch", "qemu.configure", "qemu.build"]


def test_the_ovmf_path_is_derived_from_the_dsc_target_and_tag(tmp_path):
    tree = tmp_path / "edk2"
    (tree / "OvmfPkg").mkdir(parents=True)
    (tree / "OvmfPkg/OvmfPkgX64.dsc").write_text(
        "[Defines]\n  PLATFORM_NAME                  = Ovmf\n"
        "  OUTPUT_DIRECTORY               = Build/OvmfX64\n  SUPPORTED_ARCHITECTURES        = X64\n")
    ovmf = manifests.load(LEGACY).ovmf
    assert edk2.image_path(tree, ovmf) == tree / "Build/OvmfX64/DEBUG_GCC6/FV/OVMF.fd"
    release = manifests.Ovmf(ovmf.repo, (), ovmf.platform, "RELEASE", "X64", "GCC5")
    assert edk2.image_path(tree, release) == tree / "Build/OvmfX64/RELEASE_GCC5/FV/OVMF.fd"
    assert edk2.image_path(tmp_path / "none", ovmf) is None


class _Notes:
    def __init__(self):
        self.lines = []

    def note(self, text):
        self.lines.append(text)


def test_an_undefined_toolchain_tag_is_caught_before_the_build(tmp_path):
    (tmp_path / "Conf").mkdir()
    (tmp_path / "Conf/tools_def.txt").write_text(
        "DEFINE GCC5_X64_CC_FLAGS = -O2\n"
        "*_GCC5_*_*_FAMILY          = GCC\n"
        "DEBUG_GCC5_X64_CC_FLAGS    = DEF(GCC5_X64_CC_FLAGS)\n"
        "*_CLANGDWARF_X64_CC_PATH   = ENV(CLANG_BIN)clang\n")
    with pytest.raises(Exception, match=r"toolchain tag GCC6 is not defined in .*tools_def.txt "
                                        r"\(defined: CLANGDWARF, GCC5\); set ovmf.toolchain"):
        edk2.CheckToolchain(tmp_path, "GCC6").run(_Notes())
    notes = _Notes()
    edk2.CheckToolchain(tmp_path, "GCC5").run(notes)
    assert "GCC5 is defined" in notes.lines[0]


def test_kernel_config_base_current_reads_the_running_kernels_config(tmp_path):
    root = tmp_path / "root"
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/osrelease").write_text("6.8.0-tdx\n")
    (root / "boot").mkdir()
    (root / "boot/config-6.8.0-tdx").write_text("CONFIG_KVM=m\n")
    loaded = manifests.load()  # the default (upstream) starts from the running kernel's too
    ctx = steps.Context(loaded, tmp_path / "w", 2, False, HostRoot(root))
    configure = steps.KernelConfigure()
    assert configure.base_file(ctx) == root / "boot/config-6.8.0-tdx"
    assert configure.actions(ctx)[0].show() == [f"copy {root}/boot/config-6.8.0-tdx -> {tmp_path}/w/src/kernel/.config"]
    assert configure.inputs(ctx)["base_sha256"] is not None
    # no config for the running kernel: start from the architecture's defconfig
    (root / "boot/config-6.8.0-tdx").unlink()
    assert configure.base_file(ctx) is None
    assert configure.actions(ctx)[0].show()[0].endswith("&& make defconfig")


BAD = [
    ("[qemu]\nurl = 'x'\n", "qemu.ref: missing"),
    ("[kernel]\nurl = 'https://e/x'\nref = 'a'\n[kernel.config]\nenable = 'KVM'\n",
     "kernel.config.enable: expected a list of strings, got a string"),
    ("[kernel]\nurl = 'https://e/x'\nref = 'a'\n[kernel.config]\nenable = ['KVM', 'intel tdx']\n",
     "kernel.config.enable[1]: 'intel tdx' is not a Kconfig symbol"),
    ("[kernel]\nurl = 'https://e/x'\nref = 'a'\n[kernel.config]\nenable = ['KVM']\ndisable = ['CONFIG_KVM']\n",
     "kernel.config.disable: KVM is also in kernel.config.enable"),
    ("[kernel]\nurl = 'https://e/x'\nref = 'a'\n[kernel.config]\nbase = 'nowhere.config'\n",
     "kernel.config.base: 'nowhere.config' is neither current nor defconfig nor an existing config file"),
    ("[qemu]\nurl = 'https://e/q'\nref = 'v1'\nconfigure = ['--enable-kvm', 3]\n",
     "qemu.configure[1]: expected a string, got a number"),
    ("[qemu]\nurl = 'https://e/q'\nref = '--upload-pack=evil'\n",
     "qemu.ref: '--upload-pack=evil' cannot start with '-'"),
    ("[qemu]\nurl = 'no/such/dir'\nref = 'v1'\n", "qemu.url: 'no/such/dir' is neither a URL nor an existing local path"),
    ("[qemu]\nurl = 'https://e/q'\nref = 'v1'\npatches = [{ repo = 'tdx', glob = '*.mbox' }]\n",
     "qemu.patches[0].repo: 'tdx' is not a [repos.NAME] table"),
    ("[repos.tdx]\nurl = 'https://e/t'\nref = 'b'\n[qemu]\nurl = 'https://e/q'\nref = 'v1'\n"
     "patches = [{ repo = 'tdx', glob = '../x/*.mbox' }]\n",
     "qemu.patches[0].glob: '../x/*.mbox' must be a path inside the tree"),
    ("[qemu]\nurl = 'https://e/q'\nref = 'v1'\ndepth = 0\n", "qemu.depth: expected a whole number >= 1"),
    ("[qemu]\nurl = 'https://e/q'\nref = 'v1'\nflags = []\n", "qemu.flags: unknown field"),
    ("[ovmf]\nurl = 'https://e/e'\nref = 't'\nplatform = 'OvmfPkg/OvmfPkgX64.dsc'\ntarget = 'FAST'\n"
     "toolchain = 'GCC5'\n", "ovmf.target: 'FAST': use one of DEBUG, RELEASE, NOOPT"),
    ("[ovmf]\nurl = 'https://e/e'\nref = 't'\nplatform = 'OvmfPkg/Ovmf.fdf'\ntarget = 'DEBUG'\n"
     "toolchain = 'GCC5'\n", "ovmf.platform: 'OvmfPkg/Ovmf.fdf' is not a .dsc platform file"),
    ("[ovmf]\nurl = 'https://e/e'\nref = 't'\nplatform = 'OvmfPkg/OvmfPkgX64.dsc'\ntarget = 'DEBUG'\n",
     "ovmf.toolchain: missing"),
    ("[ovmf]\nurl = 'https://e/e'\nref = 't'\nsubmodules = 'yes'\nplatform = 'a.dsc'\ntarget = 'DEBUG'\n"
     "toolchain = 'GCC5'\n", "ovmf.submodules: expected true, false or a list of submodule paths, got a string"),
    ("repos = 3\n[qemu]\nurl = 'https://e/q'\nref = 'v1'\n", "repos: expected a table of [repos.NAME] tables"),
    ("[repos.kernel]\nurl = 'https://e/t'\nref = 'b'\n[qemu]\nurl = 'https://e/q'\nref = 'v1'\n",
     "repos.kernel: a repository name is"),
    ("[builds]\n", "builds: unknown field; known: repos, mirrors, kernel, qemu, ovmf"),
    ("[repos.tdx]\nurl = 'https://e/t'\nref = 'b'\n", "kernel: the manifest builds nothing"),
    ("[qemu\n", "not valid TOML: "),
]


@pytest.mark.parametrize("text, problem", BAD)
def test_bad_manifests_are_one_line_errors_naming_file_and_field(tmp_path, text, problem):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(InputError) as caught:
        manifests.load(file)
    message = str(caught.value)
    assert message.startswith(f"manifest {file}: {problem}"), message
    assert "\n" not in message


def test_missing_manifest_and_unknown_component_through_the_cli(tmp_path):
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})
    missing = CliRunner().invoke(group, ["build", "plan", "--manifest", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2
    assert missing.stderr == f"tdxvirt: error: manifest {tmp_path}/nope.toml: no such file; give an " \
                             "existing --manifest FILE or a shipped one by name (upstream, " \
                             "intel-device-passthrough)\n"
    unknown = CliRunner().invoke(group, ["build", "plan", "firmware"])
    assert unknown.exit_code == 2
    assert unknown.stderr == "tdxvirt: error: unknown component 'firmware': use kernel, qemu, ovmf or all\n"
    only_qemu = tmp_path / "q.toml"
    only_qemu.write_text("[qemu]\nurl = 'https://e/q'\nref = 'v1'\n")
    absent = CliRunner().invoke(group, ["build", "plan", "kernel", "--manifest", str(only_qemu)])
    assert absent.exit_code == 2
    assert f"manifest {only_qemu} has no [kernel] table" in absent.stderr


def _toml(value) -> str:
    """A TOML value (enough for the manifest's shapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        # TOML has no surrogate escapes; DEL, which JSON leaves raw, TOML wants escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


FIELDS = {  # field -> the type it wants
    ("kernel", "ref"): str, ("kernel", "config", "enable"): list, ("kernel", "config", "base"): str,
    ("qemu", "configure"): list, ("qemu", "submodules"): bool, ("ovmf", "target"): str,
    ("ovmf", "toolchain"): str, ("kernel", "patches"): list, ("repos", "tdx-linux", "ref"): str,
}
WRONG = st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.just("x"), st.integers(), max_size=1),
                  st.text(max_size=8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(FIELDS)), value=WRONG)
def test_any_wrong_value_in_any_field_is_an_input_error_naming_it(tmp_path, field, value):
    import tomllib

    data = tomllib.loads(shipped_path(LEGACY).read_text())
    wanted = FIELDS[field]
    if isinstance(value, wanted) and not (wanted is not bool and isinstance(value, bool)):
        return  # the right type: covered by the good manifests
    table = data
    for key in field[:-1]:
        table = table[key]
    table[field[-1]] = value
    text = "\n".join(f"[{'.'.join(path)}]\n" + "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in body.items())
                     for path, body in _tables(data))
    file = tmp_path / "wrong.toml"
    file.write_text(text + "\n")
    with pytest.raises(InputError) as caught:
        manifests.load(file)
    dotted = ".".join(field)
    assert re.match(rf"manifest {re.escape(str(file))}: {re.escape(dotted)}[\[.:]", str(caught.value)), str(caught.value)


def _tables(data, path=()):
    """(path, plain values) of every table, the parent before its sub-tables."""
    plain = {k: v for k, v in data.items() if not isinstance(v, dict)}
    subtables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path:
        yield path, plain
    for key, value in subtables.items():
        yield from _tables(value, path + (key,))
