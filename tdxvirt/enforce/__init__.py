"""Enforcement inside libvirt: a qemu hook that refuses to start, restore or migrate a
TD that is no longer what root recorded, whichever tool asks (virsh, virt-manager,
autostart, a snapshot revert). ``hook`` is what runs in the daemon; ``script`` is the
small file ``host setup`` (and the simulated host) installs in libvirt's hook directory."""
