"""``guest check-config`` against real Debian kernel configs, and edited copies of them.

The configs come from Debian's own kernel packages: ``apt-get download`` the .deb, pull
``./boot/config-*`` out of ``dpkg-deb --fsys-tarfile`` (nothing is installed), and keep
them under ``<state>/fixtures/kernel-configs/``. ``scripts/setup`` can fetch them ahead
of time with ``.venv/bin/python tests/test_guest_config.py``.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tdxvirt.errors import InputError, NotFoundError
from tdxvirt.guest.checks import REQUIREMENTS, check_config
from tdxvirt.kconfig import load_kernel_config, parse_kernel_config
from tdxvirt.paths import state_dir
from tdxvirt.sim.guest import resolve_kernel

# role -> metapackages to try, first known wins. "cloud": the kernel Debian's cloud
# images boot (6.1 on Debian 12: no TDX guest driver yet). "newest": the newest generic
# kernel of this release (6.12 on Debian 12 and 13).
KERNEL_ROLES = {
    "cloud": ("linux-image-cloud-amd64",),
    "newest": ("linux-image-6.12-amd64", "linux-image-amd64"),
}


def kernel_config_dir() -> Path:
    return state_dir() / "fixtures" / "kernel-configs"


_resolve = resolve_kernel  # the real kernel package behind a metapackage (tdxvirt.sim.guest)


def _extract_config(deb: Path, target_dir: Path) -> Path:
    """Stream dpkg-deb's data tar and keep only ./boot/config-*; nothing is installed."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if re.fullmatch(r"\./boot/config-[^/]+", member.name) and member.isfile():
                    target = target_dir / Path(member.name).name
                    target.write_bytes(tar.extractfile(member).read())
                    break
            else:
                raise RuntimeError(f"{deb.name} holds no /boot/config-*")
        proc.stdout.read()  # let dpkg-deb finish writing
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb.name} failed")
    return target


def fetch_kernel_configs(directory: Path | None = None) -> dict[str, Path]:
    """role -> config file, downloading only what the cache lacks."""
    directory = directory or kernel_config_dir()
    directory.mkdir(parents=True, exist_ok=True)
    index_file = directory / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    configs = {}
    for role, metapackages in KERNEL_ROLES.items():
        if role in index and (directory / index[role]).is_file():
            configs[role] = directory / index[role]
            continue
        package = next(filter(None, map(_resolve, metapackages)), None)
        if package is None:
            raise RuntimeError(f"apt knows none of {metapackages}; run `apt-get update` (scripts/setup)")
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run(["apt-get", "download", "-q", package], cwd=scratch, check=True,
                           capture_output=True)
            configs[role] = _extract_config(next(Path(scratch).glob("*.deb")), directory)
        index[role] = configs[role].name
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    return configs


@pytest.fixture(scope="session")
def kernel_configs() -> dict[str, Path]:
    try:
        return fetch_kernel_configs()
    except (RuntimeError, subprocess.CalledProcessError, OSError) as error:
        pytest.fail(f"cannot fetch Debian kernel configs: {error}")


@pytest.fixture
def run_cli():
    from tdxvirt.cli import main
    from tdxvirt.cli.guest import guest

    if "guest" not in main.commands:  # until the lead wires it into tdxvirt.cli
        main.add_command(guest)

    def invoke(*args):
        result = CliRunner().invoke(main, list(args))
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result

    return invoke


def _grep_state(path: Path, symbol: str) -> str | None:
    """What grep (not tdxvirt's parser) finds for a symbol: "y", "m", "n" or None."""
    found = subprocess.run(["grep", "-E", f"^(CONFIG_{symbol}=|# CONFIG_{symbol} is not set)", str(path)],
                           capture_output=True, text=True, check=False).stdout.strip()
    if not found:
        return None
    return "n" if found.startswith("#") else found.split("=", 1)[1]


def _kernel_version(path: Path) -> tuple[int, int]:
    major, minor = re.match(r"config-(\d+)\.(\d+)", path.name).groups()
    return int(major), int(minor)


# --- real configs ---------------------------------------------------------------------

@pytest.mark.parametrize("role", sorted(KERNEL_ROLES))
def test_parser_reads_every_checked_option_as_grep_does(kernel_configs, role):
    path = kernel_configs[role]
    report = check_config(load_kernel_config(path))
    assert report.config.arch == "x86"
    # Debian names 6.1.192 "6.1.0-56" (its ABI): major.minor agree.
    assert tuple(map(int, report.config.version.split(".")[:2])) == _kernel_version(path)
    for result in report.results:
        assert result.state == _grep_state(path, result.requirement.symbol), result.requirement.symbol


@pytest.mark.parametrize("role", sorted(KERNEL_ROLES))
def test_cli_exit_code_and_named_options_follow_the_report(kernel_configs, run_cli, role):
    path = kernel_configs[role]
    report = check_config(load_kernel_config(path))
    result = run_cli("guest", "check-config", str(path))
    assert result.exit_code == (0 if report.ok else 1)
    for missing in report.missing:
        assert f"CONFIG_{missing.requirement.symbol}" in result.stderr
    assert result.stderr.count("\n") <= 1  # one line at most
    table = result.stdout.splitlines()
    assert table[1].split() == ["GROUP", "OPTION", "NEEDS", "HAS", "RESULT", "NOTE"]
    assert len([line for line in table if "CONFIG_" in line and not line.startswith("Advised")]) == len(REQUIREMENTS)


def test_kernels_before_6_2_lack_the_tdx_guest_driver(kernel_configs, run_cli):
    old = [path for path in kernel_configs.values() if _kernel_version(path) < (6, 2)]
    if not old:
        pytest.skip("this release's apt lists hold no kernel older than 6.2 (Debian 12's cloud kernel is 6.1)")
    for path in old:
        result = run_cli("guest", "check-config", str(path), "--json")
        assert result.exit_code == 1
        data = json.loads(result.stdout)
        assert "CONFIG_TDX_GUEST_DRIVER" in data["missing"]
        driver = next(c for c in data["checks"] if c["option"] == "CONFIG_TDX_GUEST_DRIVER")
        assert driver["state"] is None and driver["has"] == "absent"  # the driver came in 6.2
        assert "CONFIG_TDX_GUEST_DRIVER" in result.stderr


def test_debian_6_12_kernel_is_a_complete_guest_kernel(kernel_configs, run_cli):
    path = kernel_configs["newest"]
    assert _kernel_version(path) >= (6, 12)
    result = run_cli("guest", "check-config", str(path))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.rstrip().endswith("Every required option is set.")
    rows = {word: line for line in result.stdout.splitlines() for word in line.split()
            if word.startswith("CONFIG_")}
    # Built in or module, said for each: Debian builds ECDH as a module and ECDSA in.
    assert _grep_state(path, "CRYPTO_ECDH") == "m" and "module" in rows["CONFIG_CRYPTO_ECDH"]
    assert "must load before nvidia" in rows["CONFIG_CRYPTO_ECDH"]
    assert _grep_state(path, "CRYPTO_ECDSA") == "y" and "built in" in rows["CONFIG_CRYPTO_ECDSA"]


# --- edited copies of the complete config ----------------------------------------------

def _edited(source: Path, target: Path, symbol: str, replacement: str | None) -> Path:
    """A copy of ``source`` with the line of ``symbol`` replaced (None: removed)."""
    pattern = re.compile(rf"^(CONFIG_{symbol}=.*|# CONFIG_{symbol} is not set)$")
    lines = source.read_text().splitlines()
    edited = [replacement if pattern.match(line) else line for line in lines]
    assert edited != lines, f"{symbol} not in {source.name}"
    target.write_text("\n".join(line for line in edited if line is not None) + "\n")
    return target


@pytest.mark.parametrize("requirement", [r for r in REQUIREMENTS if r.required], ids=lambda r: r.symbol)
def test_removing_a_required_option_fails_naming_it(kernel_configs, tmp_path, run_cli, requirement):
    path = _edited(kernel_configs["newest"], tmp_path / "config", requirement.symbol, None)
    result = run_cli("guest", "check-config", str(path), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["missing"] == [f"CONFIG_{requirement.symbol}"]
    assert f"CONFIG_{requirement.symbol}" in result.stderr


@pytest.mark.parametrize("symbol", ["INTEL_TDX_GUEST", "CRYPTO_ECDSA", "CRYPTO_ECRDSA", "VIRTIO_VSOCKETS"])
def test_an_option_that_is_not_set_fails(kernel_configs, tmp_path, symbol):
    path = _edited(kernel_configs["newest"], tmp_path / "config", symbol, f"# CONFIG_{symbol} is not set")
    report = check_config(load_kernel_config(path))
    [missing] = report.missing
    assert (missing.requirement.symbol, missing.state, missing.has) == (symbol, "n", "not set")


def test_module_where_built_in_is_needed_fails(kernel_configs, tmp_path):
    path = _edited(kernel_configs["newest"], tmp_path / "config", "INTEL_TDX_GUEST", "CONFIG_INTEL_TDX_GUEST=m")
    [missing] = check_config(load_kernel_config(path)).missing
    assert (missing.requirement.symbol, missing.has, missing.needs) == ("INTEL_TDX_GUEST", "module", "built in")


def test_spdm_crypto_as_modules_passes_saying_so(kernel_configs, tmp_path, run_cli):
    path = kernel_configs["newest"]
    for symbol in ("CRYPTO_ECC", "CRYPTO_ECDSA"):
        path = _edited(path, tmp_path / f"config-{symbol}", symbol, f"CONFIG_{symbol}=m")
    report = check_config(load_kernel_config(path))
    assert report.ok
    states = {r.requirement.symbol: (r.has, r.note) for r in report.results}
    assert states["CRYPTO_ECDSA"] == ("module", "module: must load before nvidia (tdxvirt's first boot does it)")
    assert states["CRYPTO_ECC"] == ("module", "module: loaded on demand")
    assert run_cli("guest", "check-config", str(path)).exit_code == 0


def test_missing_advised_option_is_listed_but_passes(kernel_configs, tmp_path, run_cli):
    path = _edited(kernel_configs["newest"], tmp_path / "config", "TSM_REPORTS", None)
    result = run_cli("guest", "check-config", str(path))
    assert result.exit_code == 0
    assert "Advised, not required: CONFIG_TSM_REPORTS" in result.stdout


def test_proc_config_gz_is_read(kernel_configs, tmp_path):
    packed = tmp_path / "config.gz"
    packed.write_bytes(gzip.compress(kernel_configs["newest"].read_bytes()))
    assert (check_config(load_kernel_config(packed)).as_dict()["checks"]
            == check_config(load_kernel_config(kernel_configs["newest"])).as_dict()["checks"])


# --- bad input ---------------------------------------------------------------------------

def test_bad_files_are_refused_in_one_line(tmp_path, run_cli):
    (tmp_path / "notes.txt").write_text("hello\n# just a comment\n")
    cases = {
        str(tmp_path / "absent"): (2, "does not exist"),
        str(tmp_path): (2, "is a directory"),
        str(tmp_path / "notes.txt"): (2, "is not a kernel config"),
    }
    for argument, (code, words) in cases.items():
        result = run_cli("guest", "check-config", argument)
        assert result.exit_code == code, argument
        assert result.stderr.startswith("tdxvirt: error: ") and words in result.stderr
        assert result.stderr.count("\n") == 1
    with pytest.raises(NotFoundError):
        load_kernel_config(tmp_path / "absent")
    with pytest.raises(InputError):
        load_kernel_config(tmp_path / "notes.txt")


# --- the parser ----------------------------------------------------------------------------

def test_parser_reads_each_kconfig_line_form():
    config = parse_kernel_config(
        "#\n# Linux/x86 6.12.0 Kernel Configuration\n#\n"
        'CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D="a \\"quoted\\" \\\\ word"\n'
        "CONFIG_E=0x10\nCONFIG_F=-1\n# a comment that mentions CONFIG_G=y\nnonsense line\n"
    )
    assert config.values == {"A": "y", "B": "m", "C": "n", "D": 'a "quoted" \\ word', "E": "0x10", "F": "-1"}
    assert (config.arch, config.version) == ("x86", "6.12.0")
    assert config.state("G") is None


_symbols = st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True)
_values = st.one_of(st.sampled_from(["y", "m", "n"]), st.integers(-5, 10**6).map(str),
                    st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=20))


@given(st.dictionaries(_symbols, _values, max_size=30))
def test_parser_round_trips_what_kconfig_writes(entries):
    lines = []
    for symbol, value in entries.items():
        if value == "n":
            lines.append(f"# CONFIG_{symbol} is not set")
        elif value in ("y", "m") or re.fullmatch(r"-?\d+", value):
            lines.append(f"CONFIG_{symbol}={value}")
        else:  # Kconfig quotes strings, escaping '"' and '\'
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'CONFIG_{symbol}="{escaped}"')
    assert parse_kernel_config("\n".join(lines) + "\n").values == entries


if __name__ == "__main__":  # scripts/setup: fetch the configs ahead of the tests
    for role, path in fetch_kernel_configs().items():
        print(f"{role}: {path}")
    sys.exit(0)
