# Copyright: tdxvirt developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The options every tdxvirt.tdx module takes to choose the host (Ansible's doc fragment:
each module's documentation extends it instead of repeating it)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  uri:
    description: libvirt URI (default C($LIBVIRT_DEFAULT_URI), else C(qemu:///system)).
    type: str
  sim:
    description: Use tdxvirt's simulated TDX host (C(tdxvirt --sim)).
    type: bool
    default: false
  host_root:
    description: Read host facts below this directory instead of C(/) (C(--host-root)).
    type: path
requirements:
  - tdxvirt (the library) on the managed host
"""
