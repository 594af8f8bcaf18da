"""define's options end to end on the TDX-aware libvirt (test driver, real daemon)."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from lxml import etree

from tdxvirt.config import Config, load_config
from tdxvirt.domain.domainxml import read_domain_xml
from tdxvirt.domain.spec import TDSpec
from tdxvirt.domain.td_rules import td_problems
from tdxvirt.errors import HostNotReadyError, InputError, LibvirtOperationError
from tdxvirt.lifecycle import tds
from tdxvirt.sim.hostroot import FakePciDevice, build_host_root

B64_48 = "q" * 64  # base64 of 48 bytes


def spec(name, gpu, **options):
    return TDSpec.from_user(name=name, gpus=[gpu] if gpu else [], **options)


def domain_xml(conn, name):
    return etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode())


def test_image_boots_a_new_overlay_and_never_touches_the_base(conn, gpu_host, td_name, tmp_path):
    host, gpu = gpu_host
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    config = Config(overlay_dir=str(tmp_path / "images"))
    td = tds.define_td(conn, host, spec(td_name, gpu, image=str(base)), config)
    overlay = tmp_path / "images" / f"{td_name}.qcow2"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                          capture_output=True, text=True, check=True).stdout
    assert f'"backing-filename": "{base}"' in info
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before
    assert domain_xml(conn, td_name).find("devices/disk/source").get("file") == str(overlay)
    assert td.plan.disk.overlay_base == str(base)
    assert read_domain_xml(conn.lookupByName(td_name).XMLDesc(0)).overlay == str(overlay)


def test_failed_define_removes_the_overlay_it_made(conn, gpu_host, td_name, tmp_path):
    host, gpu = gpu_host
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    config = Config(overlay_dir=str(tmp_path / "images"))
    broken = spec(td_name, gpu, image=str(base), vcpus=4)
    original = conn.defineXMLFlags

    class Refusing:
        """The real connection, whose define gets XML that libvirt's validation refuses."""

        def __getattr__(self, name):
            return getattr(conn, name)

        def defineXMLFlags(self, xml, flags):  # noqa: N802 (libvirt's name)
            return original(xml.replace("<vcpu placement='static'>", "<vcpu placement='bogus'>"), flags)

    with pytest.raises(LibvirtOperationError, match="libvirt refused to define"):
        tds.define_td(Refusing(), host, broken, config)
    assert not (tmp_path / "images" / f"{td_name}.qcow2").exists()
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]


def test_existing_overlay_is_never_overwritten(conn, gpu_host, td_name, tmp_path):
    host, gpu = gpu_host
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / f"{td_name}.qcow2").write_text("precious")
    with pytest.raises(InputError, match="already exists"):
        tds.define_td(conn, host, spec(td_name, gpu, image=str(base)),
                      Config(overlay_dir=str(tmp_path / "images")))
    assert (tmp_path / "images" / f"{td_name}.qcow2").read_text() == "precious"


def test_tdx_options_reach_libvirt(conn, gpu_host, td_name):
    host, gpu = gpu_host
    tds.define_td(conn, host, spec(td_name, gpu, mr_config_id=B64_48, mr_owner=B64_48,
                                   qgs="/var/run/tdx-qgs/qgs.socket", debug=True))
    launch = domain_xml(conn, td_name).find("launchSecurity")
    assert launch.findtext("policy") == "0x10000001"
    assert launch.findtext("mrConfigId") == B64_48 and launch.findtext("mrOwner") == B64_48
    assert launch.find("quoteGenerationService").get("path") == "/var/run/tdx-qgs/qgs.socket"


def test_vsock_quote_service_is_refused_in_the_native_dialect(conn, gpu_host, td_name):
    host, gpu = gpu_host
    with pytest.raises(InputError, match="upstream libvirt only takes a unix socket path"):
        tds.define_td(conn, host, spec(td_name, gpu, qgs="vsock:2:4050"))


def test_host_without_tdx_is_refused_unless_plain(conn, tmp_path, td_name):
    host = build_host_root(tmp_path / "r", tdx_enabled=False, devices=(
        FakePciDevice("e001:38:00.0"),))
    with pytest.raises(HostNotReadyError, match="TDX is not enabled in KVM"):
        tds.define_td(conn, host, spec(td_name, "e001:38:00.0"))
    td = tds.define_td(conn, host, spec(td_name, "e001:38:00.0", tdx=False))
    root = domain_xml(conn, td_name)
    assert root.find("launchSecurity") is None and td.plan.dialect == "plain"
    assert root.find("os").get("firmware") == "efi"


def test_shared_gpu_needs_allow_shared(conn, gpu_host, td_name):
    host, gpu = gpu_host
    tds.define_td(conn, host, spec(td_name, gpu))
    with pytest.raises(InputError, match="--allow-shared"):
        tds.define_td(conn, host, spec(td_name + "-b", gpu))
    try:
        tds.define_td(conn, host, spec(td_name + "-b", gpu, allow_shared=True))
    finally:
        tds.undefine(conn, td_name + "-b")


def test_ppcie_without_nvswitches_is_refused(conn, gpu_host, td_name):
    host, gpu = gpu_host
    with pytest.raises(InputError, match="no NVSwitch found"):
        tds.define_td(conn, host, spec(td_name, gpu, ppcie=True))


def test_ppcie_with_some_gpus_warns(conn, tmp_path, td_name):
    devices = (FakePciDevice("e002:18:00.0"), FakePciDevice("e002:2a:00.0", iommu_group=43),
               FakePciDevice("e002:05:00.0", iommu_group=50, driver=None,
                             overrides={"device": "0x22a3", "class": "0x068000"}))
    host = build_host_root(tmp_path / "r", devices=devices)
    td = tds.define_td(conn, host, spec(td_name, "e002:18:00.0", ppcie=True))
    assert [h.kind for h in td.plan.hostdevs] == ["gpu", "nvswitch"]
    assert any("1 of the board's 2 GPUs" in w for w in td.plan.warnings)


def test_direct_kernel_boot_adds_clearcpuid(conn, gpu_host, td_name, tmp_path):
    host, gpu = gpu_host
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    td = tds.define_td(conn, host, spec(td_name, gpu, kernel=str(kernel), cmdline="console=ttyS0"))
    assert domain_xml(conn, td_name).findtext("os/cmdline") == "console=ttyS0 clearcpuid=mtrr"
    # not below the host root: define records what it can, and says what is left unchecked
    assert f"its kernel {kernel} is missing: root's record holds no SHA-256 of it, so its starts do " \
           f"not check" in " ".join(td.plan.warnings) and f"`tdxvirt adopt {td_name}`" in td.plan.warnings[-1]
    (firmware, kernel_state) = tds.show(conn, td_name, host).files
    assert (firmware["state"], kernel_state["state"]) == ("same", "unrecorded")


def test_remote_uri_with_image_is_refused(gpu_host, tmp_path):
    from tdxvirt.facts.libvirt import LibvirtFacts
    from tdxvirt.lifecycle.assemble import _overlay_dir

    spec_ = TDSpec(name="x", gpus=(), image="/base.qcow2")
    with pytest.raises(InputError, match="URI is remote"):
        _overlay_dir(spec_, Config(), LibvirtFacts(None, "qemu+ssh://gpu-host/system"))


@pytest.mark.parametrize("mutation, problem", [
    (("<loader type='rom'", "<loader type='pflash'"), "ROM"),
    (("</os>", "<nvram>/var/lib/x.fd</nvram></os>"), "NVRAM"),
    (("<smm state='off'/>", "<smm state='on'/>"), "SMM"),
    (("<pmu state='off'/>", ""), "PMU"),
    (("<ioapic driver='qemu'/>", ""), "split irqchip"),
    (("<policy>0x10000000</policy>", "<policy>0x10000002</policy>"), "bits libvirt does not allow"),
    (("machine='q35'", "machine='pc'"), "q35"),
    (("<vcpu ", "<sysinfo type='fwcfg'><entry name='opt/ovmf/X-PciMmio64Mb'>1</entry></sysinfo><vcpu "),
     "opt/ovmf/"),
])
def test_td_rules_catch_what_the_test_driver_accepts(conn, gpu_host, td_name, mutation, problem):
    host, gpu = gpu_host
    xml = tds.assemble_td(conn, host, spec(td_name, gpu)).xml
    assert td_problems(xml) == []
    problems = td_problems(xml.replace(*mutation))
    assert len(problems) == 1 and problem in problems[0]


def test_config_file_supplies_defaults(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('[defaults]\novmf = "/opt/tdx/OVMF.fd"\noverlay_dir = "/srv/images"\n')
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config))
    assert load_config() == Config(ovmf="/opt/tdx/OVMF.fd", overlay_dir="/srv/images")


@pytest.mark.parametrize("text, message", [
    ("[defaults\n", "fix the TOML syntax"),
    ('[defaults]\nfirmware = "/x"\n', "unknown key defaults.firmware"),
    ('[defaults]\novmf = "relative.fd"\n', "absolute path"),
    ('[other]\nx = 1\n', "unknown table"),
])
def test_bad_config_file_is_one_clear_error(tmp_path, monkeypatch, text, message):
    config = tmp_path / "config.toml"
    config.write_text(text)
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config))
    with pytest.raises(InputError, match=message):
        load_config()


def test_define_uses_recorded_builds_and_show_names_them(conn, gpu_host, td_name, tmp_path,
                                                         monkeypatch):
    """What `tdxvirt build` recorded becomes the emulator and loader, unless given."""
    from tdxvirt.build import artifacts

    host, gpu = gpu_host
    state = tmp_path / "state"
    qemu, ovmf = tmp_path / "qemu-system-x86_64", tmp_path / "OVMF.fd"
    qemu.write_bytes(b"")
    ovmf.write_bytes(b"")
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(state))
    record = artifacts.record_file()
    artifacts.update(record, "qemu", {"ref": "v9.1.0-rc0", "revision": "a" * 40,
                                      "patches": ["tdx_qemu_baseline_x.mbox"],
                                      "artifacts": {"qemu-system-x86_64": str(qemu)}})
    artifacts.update(record, "ovmf", {"ref": "edk2-stable202405", "revision": "b" * 40,
                                      "artifacts": {"OVMF.fd": str(ovmf)}})
    td = tds.define_td(conn, host, spec(td_name, gpu))
    assert (td.plan.emulator, td.plan.loader) == (str(qemu), str(ovmf))
    builds = tds.show(conn, td_name).builds
    assert any(b.startswith("qemu v9.1.0-rc0 (aaaaaaaaaaaa) + tdx_qemu_baseline_x.mbox") for b in builds)
    assert any(b.startswith("ovmf edk2-stable202405") for b in builds)
    explicit = tds.assemble_td(conn, host, spec(td_name + "x", gpu, allow_shared=True,
                                                qemu=str(ovmf), ovmf=str(qemu)))
    assert (explicit.plan.emulator, explicit.plan.loader) == (str(ovmf), str(qemu))


@pytest.fixture
def ssh_public_key(tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def test_cloud_init_seed_is_created_attached_and_removed_with_storage(
        conn, gpu_host, td_name, tmp_path, ssh_public_key):
    from tdxvirt.guest.seed import read_seed_iso

    host, gpu = gpu_host
    td = tds.define_td(conn, host, spec(td_name, gpu, ssh_key=[f"{ssh_public_key}.pub"],
                                        network="default"),
                       Config(overlay_dir=str(tmp_path / "img")))
    seed = tmp_path / "img" / f"{td_name}-seed.iso"
    assert td.plan.seed == str(seed) and seed.exists()
    label, files = read_seed_iso(seed)
    user_data = files["user-data"].decode()
    assert label == "cidata"
    assert open(f"{ssh_public_key}.pub").read().split()[1] in user_data
    assert "clearcpuid=mtrr" in user_data
    root = domain_xml(conn, td_name)
    assert root.find("devices/disk/source").get("file") == str(seed)
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert tds.undefine(conn, td_name, remove_storage=True,
                        config=Config(overlay_dir=str(seed.parent))) == [str(seed)]
    assert not seed.exists()


def test_private_key_or_bad_user_data_fail_before_anything(conn, gpu_host, td_name, tmp_path,
                                                          ssh_public_key):
    host, gpu = gpu_host
    with pytest.raises(InputError, match=r"\.pub"):
        spec(td_name, gpu, ssh_key=[str(ssh_public_key)])
    bad = tmp_path / "user-data"
    bad.write_text("packages: [x]\n")
    with pytest.raises(InputError, match="cloud-config"):
        spec(td_name, gpu, user_data=str(bad))
    assert not (tmp_path / "img").exists()
