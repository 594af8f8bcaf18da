"""What a TD's own kernel needs to run with an NVIDIA GPU in CC mode, and checking a config for it.

Sources: the user's source document (TDX guest support, and CRYPTO_ECC/_ECDH/_ECDSA/
_ECRDSA "for SPDM session establishment"), NVIDIA's open kernel modules
(``kernel-open/nvidia/internal_crypt_lib.h`` builds the driver's SPDM code on the kernel
crypto API only when AEAD, AKCIPHER, SKCIPHER, HASH, HMAC, ECDH, ECDSA, RSA and
X509_CERTIFICATE_PARSER are configured; its libspdm glue asks for ``gcm(aes)``,
``sha256``, ``sha384``, ``ecdsa-nist-p384``, ``ecdh``), and what a libvirt TD is made of
(virtio disk, network and serial ports, vsock, UEFI firmware, a GPU on a PCIe root port).

Deliberately not checked: VFIO and IOMMUFD (host side only: the guest drives the GPU
with the nvidia driver), KVM_GUEST (kvmclock is not trusted in a TD, which uses the TSC),
HYPERV and the host's KVM_INTEL.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kconfig import BUILTIN, MODULE, NOT_SET, KernelConfig

BUILTIN_ONLY = frozenset({BUILTIN})
BUILTIN_OR_MODULE = frozenset({BUILTIN, MODULE})

# ECDSA and ECDH built as modules must be loaded before nvidia, or the GPU's SPDM session
# fails and nvidia-smi finds no device (NVIDIA's guide; the driver declares a softdep).
PRELOAD_NOTE = "module: must load before nvidia (tdxvirt's first boot does it)"
# Other crypto modules are loaded by the kernel when the driver asks for the algorithm.
ON_DEMAND_NOTE = "module: loaded on demand"
PRELOADED = frozenset({"CRYPTO_ECDSA", "CRYPTO_ECDH"})


@dataclass(frozen=True)
class Requirement:
    symbol: str  # without CONFIG_
    group: str
    accept: frozenset[str]
    required: bool  # False: recommended only; its absence does not fail the check
    why: str


def _req(group, symbol, why, accept=BUILTIN_OR_MODULE, required=True) -> Requirement:
    return Requirement(symbol=symbol, group=group, accept=accept, required=required, why=why)


_TDX = "TDX guest"
_SPDM = "SPDM crypto"
_NVIDIA = "NVIDIA driver"
_VIRTIO = "virtio"
_VSOCK = "vsock"
_PLATFORM = "platform"

REQUIREMENTS: tuple[Requirement, ...] = (
    _req(_TDX, "INTEL_TDX_GUEST", "the kernel runs as a TD (TDCALLs, #VE handling, shared memory)",
         accept=BUILTIN_ONLY),
    _req(_TDX, "TDX_GUEST_DRIVER", "/dev/tdx_guest: TD reports and quotes for attestation (Linux >= 6.2)"),
    _req(_TDX, "TSM_REPORTS", "configfs-tsm attestation reports (Linux >= 6.7)", required=False),
    _req(_TDX, "UNACCEPTED_MEMORY", "lazy memory acceptance: large TDs boot without OVMF "
         "accepting all memory first (Linux >= 6.5)", accept=BUILTIN_ONLY, required=False),
    # The four the source document names "for SPDM session establishment".
    _req(_SPDM, "CRYPTO_ECC", "elliptic-curve arithmetic under ECDH/ECDSA (source document)"),
    _req(_SPDM, "CRYPTO_ECDH", "ECDH key exchange of the GPU's SPDM session (source document)"),
    _req(_SPDM, "CRYPTO_ECDSA", "ECDSA P-384: verifies the GPU's signatures (source document)"),
    _req(_SPDM, "CRYPTO_ECRDSA", "listed by the source document for the SPDM session"),
    _req(_SPDM, "CRYPTO_KPP", "key-agreement API ECDH registers under; the Blackwell driver's "
                              "SPDM asks for it (issue 28's sources)"),
    # Without these NVIDIA's build stubs out its kernel-crypto SPDM code (internal_crypt_lib.h).
    _req(_SPDM, "CRYPTO_AEAD", "NVIDIA's driver builds SPDM on kernel crypto only with it"),
    _req(_SPDM, "CRYPTO_AKCIPHER", "NVIDIA's driver builds SPDM on kernel crypto only with it"),
    _req(_SPDM, "CRYPTO_SKCIPHER", "NVIDIA's driver builds SPDM on kernel crypto only with it"),
    _req(_SPDM, "CRYPTO_HASH", "NVIDIA's driver builds SPDM on kernel crypto only with it"),
    _req(_SPDM, "CRYPTO_HMAC", "hmac(sha384) of the SPDM session; needed by NVIDIA's build"),
    _req(_SPDM, "CRYPTO_RSA", "NVIDIA's driver builds SPDM on kernel crypto only with it"),
    _req(_SPDM, "X509_CERTIFICATE_PARSER", "parses the GPU's certificate chain; needed by NVIDIA's build"),
    _req(_SPDM, "CRYPTO_GCM", "gcm(aes): encrypts traffic between driver and GPU"),
    _req(_SPDM, "CRYPTO_AES", "gcm(aes): encrypts traffic between driver and GPU"),
    _req(_SPDM, "CRYPTO_SHA256", "sha256 used by the SPDM session"),
    _req(_SPDM, "CRYPTO_SHA512", "provides sha384, the SPDM session's hash"),
    _req(_NVIDIA, "MODULES", "the NVIDIA driver is an out-of-tree kernel module", accept=BUILTIN_ONLY),
    _req(_NVIDIA, "PCI", "the GPU is a PCI device", accept=BUILTIN_ONLY),
    _req(_NVIDIA, "PCI_MSI", "the GPU's interrupts are MSI-X", accept=BUILTIN_ONLY),
    _req(_NVIDIA, "DRM", "nvidia-drm (display, modeset); compute alone works without it", required=False),
    _req(_VIRTIO, "VIRTIO_PCI", "every virtio device of a q35 TD sits on PCI"),
    _req(_VIRTIO, "VIRTIO_BLK", "the boot disk"),
    _req(_VIRTIO, "VIRTIO_NET", "the network interface"),
    _req(_VIRTIO, "VIRTIO_CONSOLE", "virtio-serial: the QEMU guest agent's channel (tdxvirt guest verify)"),
    _req(_VSOCK, "VSOCKETS", "host-guest sockets (quote generation over vsock, agents)"),
    _req(_VSOCK, "VIRTIO_VSOCKETS", "the virtio transport of vsock"),
    _req(_PLATFORM, "EFI", "a TD boots through OVMF (UEFI)", accept=BUILTIN_ONLY),
    _req(_PLATFORM, "EFI_STUB", "GRUB and systemd-boot start the kernel as an EFI program",
         accept=BUILTIN_ONLY, required=False),
)

STATE_NAMES = {BUILTIN: "built in", MODULE: "module", NOT_SET: "not set", None: "absent"}


@dataclass(frozen=True)
class CheckResult:
    requirement: Requirement
    state: str | None  # "y", "m", "n", another value, None (absent)

    @property
    def ok(self) -> bool:
        return self.state in self.requirement.accept

    @property
    def has(self) -> str:
        return STATE_NAMES.get(self.state, self.state)

    @property
    def needs(self) -> str:
        return "built in" if self.requirement.accept == BUILTIN_ONLY else "built in or module"

    @property
    def result(self) -> str:
        if self.ok:
            return "ok"
        return "MISSING" if self.requirement.required else "advised"

    @property
    def note(self) -> str:
        if self.ok and self.state == MODULE and self.requirement.group == _SPDM:
            return PRELOAD_NOTE if self.requirement.symbol in PRELOADED else ON_DEMAND_NOTE
        if not self.ok:
            return self.requirement.why
        return ""

    def as_dict(self) -> dict:
        req = self.requirement
        return {
            "group": req.group,
            "option": f"CONFIG_{req.symbol}",
            "required": req.required,
            "needs": sorted(req.accept),
            "state": self.state,
            "has": self.has,
            "result": self.result.lower(),
            "why": req.why,
            "note": self.note,
        }


@dataclass(frozen=True)
class ConfigReport:
    config: KernelConfig
    results: tuple[CheckResult, ...]

    @property
    def missing(self) -> list[CheckResult]:
        """Required options the config lacks."""
        return [r for r in self.results if r.requirement.required and not r.ok]

    @property
    def advised(self) -> list[CheckResult]:
        return [r for r in self.results if not r.requirement.required and not r.ok]

    @property
    def ok(self) -> bool:
        return not self.missing

    def as_dict(self) -> dict:
        return {
            "config": self.config.source,
            "kernel": self.config.version,
            "arch": self.config.arch,
            "ok": self.ok,
            "missing": [f"CONFIG_{r.requirement.symbol}" for r in self.missing],
            "advised": [f"CONFIG_{r.requirement.symbol}" for r in self.advised],
            "checks": [r.as_dict() for r in self.results],
        }

    def failure_message(self) -> str:
        """One line naming every missing option, for the CLI's error."""
        names = ", ".join(f"CONFIG_{r.requirement.symbol}" for r in self.missing)
        where = self.config.source or "the kernel config"
        return (
            f"guest kernel config {where} lacks {names}; build the guest kernel with them "
            "(=y, or =m where a module is allowed) or use a distribution kernel that has them"
        )


def check_config(config: KernelConfig,
                 requirements: tuple[Requirement, ...] = REQUIREMENTS) -> ConfigReport:
    return ConfigReport(config, tuple(CheckResult(req, config.state(req.symbol)) for req in requirements))
