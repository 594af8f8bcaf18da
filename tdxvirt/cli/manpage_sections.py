"""What every man page says beyond a command's help text (man-pages(7)'s sections):
examples, exit status, environment, files. Kept beside the commands so a test can run
the examples' commands' options against the real parser."""

from __future__ import annotations

EXIT_STATUS = [
    ("0", "Success; also a start, stop or destroy of a TD already in that state (said on "
          "stdout: the state asked for holds)."),
    ("1", "tdxvirt, libvirt or the host refused or failed (one line on stderr, with the "
          "remedy); a check that found problems (host check, guest verify)."),
    ("2", "Bad input: an unknown option, an invalid value, a file that is not there."),
    ("130", "Interrupted (Ctrl-C)."),
]
ENVIRONMENT = [
    ("LIBVIRT_DEFAULT_URI", "the libvirt URI when -c is not given (else qemu:///system)"),
    ("TDXVIRT_SIM", "1: as --sim, the simulated TDX host"),
    ("TDXVIRT_HOST_ROOT", "as --host-root: read host facts below this directory"),
    ("TDXVIRT_HOST_TIMEOUT", "as --host-timeout: each host's deadline with several hosts"),
    ("TDXVIRT_CONFIG", "the config file instead of /etc/tdxvirt/config.toml (root-owned, "
                       "writable by root alone, or refused)"),
    ("TDXVIRT_STATE_DIR", "the state directory instead of /var/lib/tdxvirt (root) or the XDG "
                          "state directory"),
    ("TDXVIRT_GPU_TOOLS", "NVIDIA's gpu-admin-tools (script or nvtrust checkout) for CC modes"),
    ("TDXVIRT_SCHEMA_DIR", "libvirt's RelaxNG schemas for local validation"),
]
FILES = [
    ("/etc/tdxvirt/config.toml", "defaults (ovmf, qemu, overlay_dir, pccs_url) and [hosts]; "
                                 "~/.config/tdxvirt/config.toml for a user"),
    ("/var/lib/tdxvirt/records", "root's record of each TD (keyed by UUID): what libvirt's hook "
                                 "and start check a TD against"),
    ("/var/lib/libvirt/images, /var/lib/tdxvirt/images", "overlays and cloud-init seeds define "
                                                         "creates (the first that exists)"),
    ("/etc/libvirt/hooks/qemu.d/tdxvirt", "libvirt's hook that refuses a weakened TD at every "
                                          "start (host setup installs it)"),
    ("/etc/libvirt/qemu.conf", "what host setup edits (with a backup and --revert)"),
]
EXAMPLES = {
    "tdxvirt": [("What this host lacks for TDs with GPUs", "tdxvirt host check"),
                ("The same on the simulated TDX host", "tdxvirt --sim host check")],
    "tdxvirt define": [
        ("A TD with one GPU, booting a new overlay on a base image, with your ssh key",
         "tdxvirt define td1 --gpu 38:00.0 --image /var/lib/libvirt/images/base.qcow2 "
         "--image-format qcow2 --ssh-key ~/.ssh/id_ed25519.pub"),
        ("The domain XML only, nothing defined", "tdxvirt define td1 --gpu 38:00.0 --print-xml"),
        ("On a bridge instead of libvirt's default network",
         "tdxvirt define td1 --gpu 38:00.0 --network bridge=br0")],
    "tdxvirt start": [("Preflight, integrity check, start", "tdxvirt start td1")],
    "tdxvirt stop": [("ACPI shutdown, then power off after 60 s", "tdxvirt stop td1 --timeout 60 --force")],
    "tdxvirt undefine": [("The TD and the overlay and seed define made",
                          "tdxvirt undefine td1 --remove-storage")],
    "tdxvirt list": [("tdxvirt's TDs, and TDX domains of other tools", "tdxvirt list --foreign"),
                     ("Every host of the config file's [hosts]", "tdxvirt --fleet list")],
    "tdxvirt show": [("A TD, its disks, NICs and problems", "tdxvirt show td1")],
    "tdxvirt repair": [("What repair would change, as a diff", "tdxvirt repair td1 --dry-run")],
    "tdxvirt measure": [("The MRTD the TDX module must report", "tdxvirt measure td1")],
    "tdxvirt host check": [("A remote host, through libvirt", "tdxvirt -c qemu+ssh://root@gpu1/system host check")],
    "tdxvirt host setup": [("The exact diffs and commands, then the change",
                            "tdxvirt host setup --dry-run && tdxvirt host setup")],
    "tdxvirt gpu list": [("GPUs with their CC and PPCIe modes", "tdxvirt gpu list --modes")],
    "tdxvirt gpu detach": [("To vfio-pci, planned first", "tdxvirt gpu detach 38:00.0 --dry-run")],
    "tdxvirt gpu cc-mode": [("CC mode on (NVIDIA's tool)", "tdxvirt gpu cc-mode 38:00.0 --set on")],
    "tdxvirt guest verify": [("What a booting TD's guest reports, waiting for its agent",
                              "tdxvirt guest verify td1 --wait 120")],
    "tdxvirt guest attest": [("A TD quote checked against your collateral",
                              "tdxvirt guest attest td1 --collateral collateral.json")],
    "tdxvirt sim guest-image": [("A guest disk to boot on the simulated host",
                                 "tdxvirt sim guest-image /tmp/td/base.qcow2")],
    "tdxvirt selftest": [("Prove this host end to end and keep a report for a bug",
                          "tdxvirt selftest --gpu 38:00.0 --image /var/lib/libvirt/images/guest.qcow2 "
                          "--report selftest.md"),
                         ("The same on the simulated host (its own guest is built for the run)",
                          "tdxvirt --sim selftest")],
    "tdxvirt sim exec": [("ssh to a TD on the simulated host's network",
                          "tdxvirt sim exec -- ssh debian@192.168.122.10")],
}
