"""NVIDIA GPUs and NVSwitches on the host: discovery, vfio binding, CC / PPCIe mode.

Every host read goes through a HostRoot; every host change goes through a binder
(sysfs writes or libvirt calls) or NVIDIA's gpu-admin-tools, each shown by --dry-run.
"""
