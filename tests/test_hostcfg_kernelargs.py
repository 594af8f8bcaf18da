"""Kernel arguments: GRUB_CMDLINE_LINUX in Debian's real /etc/default/grub, and grubby."""

from __future__ import annotations

import pytest
from test_hostcfg_realfiles import grub_defaults

from tdxvirt.host.cmdline import KernelCmdline
from tdxvirt.hostcfg.kernelargs import (
    TDX_HOST_ARGS,
    GrubDefaultsError,
    apply_args,
    current_grub_args,
    edit_grub_defaults,
    grubby_command,
    missing_args,
    parse_grubby_info,
)

ARGS = " ".join(TDX_HOST_ARGS)


def _changed(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.split("\n"), after.split("\n")
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new) if a != b]


def test_debian_grub_file_gets_only_its_cmdline_line_changed():
    text = grub_defaults().read_text()
    result = edit_grub_defaults(text)
    assert _changed(text, result) == [('GRUB_CMDLINE_LINUX=""', f'GRUB_CMDLINE_LINUX="{ARGS}"')]
    assert edit_grub_defaults(result) == result
    assert current_grub_args(result) == list(TDX_HOST_ARGS)
    # GRUB_CMDLINE_LINUX_DEFAULT ("quiet") is a different variable and stays.
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"' in result


def test_conflicting_values_are_replaced_where_they_stand():
    text = 'A=1\nGRUB_CMDLINE_LINUX="console=ttyS0 intel_iommu=off kvm-intel.tdx=0"  # x\nB=2\n'
    assert edit_grub_defaults(text) == (
        'A=1\nGRUB_CMDLINE_LINUX="console=ttyS0 intel_iommu=on kvm_intel.tdx=on '
        'iommu=pt nohibernate"  # x\nB=2\n')


def test_single_quotes_bare_words_export_and_last_assignment():
    assert edit_grub_defaults("GRUB_CMDLINE_LINUX='quiet'\n") == \
        f"GRUB_CMDLINE_LINUX='quiet {ARGS}'\n"
    assert edit_grub_defaults("export GRUB_CMDLINE_LINUX=quiet\n") == \
        f'export GRUB_CMDLINE_LINUX="quiet {ARGS}"\n'
    two = 'GRUB_CMDLINE_LINUX="a"\nGRUB_CMDLINE_LINUX="b"\n'
    assert edit_grub_defaults(two) == f'GRUB_CMDLINE_LINUX="a"\nGRUB_CMDLINE_LINUX="b {ARGS}"\n'


def test_missing_variable_is_appended():
    assert edit_grub_defaults("GRUB_TIMEOUT=5") == f'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="{ARGS}"\n'


@pytest.mark.parametrize("rhs", ['"$GRUB_CMDLINE_LINUX quiet"', '"`cat /x`"', '"a\\ b"',
                                 '"never closed'])
def test_shell_tricks_are_refused_naming_the_line(rhs):
    with pytest.raises(GrubDefaultsError, match=r"/etc/default/grub line 2: "):
        edit_grub_defaults(f"# head\nGRUB_CMDLINE_LINUX={rhs}\n")


def test_args_and_running_cmdline_lookups():
    assert missing_args(["intel_iommu=on", "kvm-intel.tdx=on"], TDX_HOST_ARGS) == \
        ["iommu=pt", "kvm_intel.tdx=on", "nohibernate"]  # exact spelling is wanted
    assert apply_args("", ("a=1",)) == "a=1"
    cmdline = KernelCmdline.parse('ro foo="a b" intel_iommu=off intel_iommu=on nohibernate')
    assert cmdline.value("intel_iommu") == "on" and cmdline.value("foo") == "a b"
    assert cmdline.value("nohibernate") == "" and cmdline.value("absent") is None


GRUBBY_INFO = """index=0
kernel="/boot/vmlinuz-6.16.3-200.fc42.x86_64"
args="ro rootflags=subvol=root rhgb quiet intel_iommu=on"
root="UUID=0d5c7a9e-1111-2222-3333-444455556666"
initrd="/boot/initramfs-6.16.3-200.fc42.x86_64.img"
title="Fedora Linux (6.16.3-200.fc42.x86_64) 42 (Server Edition)"
id="0123456789abcdef-6.16.3-200.fc42.x86_64"
index=1
kernel="/boot/vmlinuz-0-rescue-0123456789abcdef"
args="ro rootflags=subvol=root"
"""


def test_grubby_info_and_command():
    kernels = parse_grubby_info(GRUBBY_INFO)
    assert kernels == [["ro", "rootflags=subvol=root", "rhgb", "quiet", "intel_iommu=on"],
                       ["ro", "rootflags=subvol=root"]]
    assert grubby_command(["iommu=pt", "nohibernate"]) == (
        "grubby", "--update-kernel=ALL", "--args=iommu=pt nohibernate")
    assert grubby_command(["nohibernate"], remove=True)[-1] == "--remove-args=nohibernate"
