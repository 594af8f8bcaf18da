"""libvirt access: the connection and its errors, finding a domain, which TDX XML
dialect the target libvirt speaks, and libvirt's own schema."""
