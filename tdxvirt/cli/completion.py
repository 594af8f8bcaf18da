"""Shell completion of TD names and GPU addresses, and `--version`.

Completion rides on click's own mechanism (``_TDXVIRT_COMPLETE=bash_source tdxvirt``,
or ``zsh_source`` / ``fish_source``). Completing must never fail loudly or be slow to
answer: a libvirt that does not answer gives no candidates, never an error.
"""

from __future__ import annotations

import click


def _session(ctx: click.Context):
    from . import Session

    root = ctx.find_root()
    params = root.params
    return Session(params.get("uri"), bool(params.get("sim")), params.get("host_root"))


def td_names(ctx: click.Context, _param, incomplete: str):
    """Names of the domains at the URI the command line names (as `tdxvirt list --foreign`)."""
    from click.shell_completion import CompletionItem

    try:
        from ..virt.conn import open_connection

        session = _session(ctx)
        if session.sim:  # completing never starts the simulated host
            from ..sim import control

            if not control.status().daemon:
                return []
        conn = open_connection(session.uri)
        try:
            names = sorted(d.name() for d in conn.listAllDomains(0))
        finally:
            conn.close()
    except Exception:  # completion offers what it can; it never breaks the shell
        return []
    return [CompletionItem(candidate) for name in names if name.startswith(incomplete)
            and (candidate := completion_word(name)) is not None]


_GLOB = set("*?[]")
_UNSAFE = set("'\"\\$`!;&|<>(){}#~ ")


def completion_word(name: str) -> str | None:
    """A libvirt name as the shell may take it from completion: None for one it cannot
    (control or format characters, a newline would forge a second candidate; quotes,
    spaces and shell syntax: typed quoted by hand), glob characters backslash-quoted
    (click's bash script expands candidates unquoted)."""
    import unicodedata

    if not name or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") or c in _UNSAFE
                       for c in name):
        return None
    return "".join(f"\\{c}" if c in _GLOB else c for c in name)


def gpu_addresses(ctx: click.Context, _param, incomplete: str):
    """NVIDIA GPUs and NVSwitches of the host root's sysfs (local hosts only)."""
    from click.shell_completion import CompletionItem

    try:
        from ..virt.conn import is_remote

        session = _session(ctx)
        if is_remote(session.uri):
            return []
        devices = session.host.path("/sys/bus/pci/devices")
        found = sorted(entry.name for entry in devices.iterdir()
                       if (entry / "vendor").is_file()
                       and (entry / "vendor").read_text().strip() == "0x10de")
    except Exception:
        return []
    return [CompletionItem(bdf) for bdf in found
            if bdf.startswith(incomplete) or bdf.split(":", 1)[-1].startswith(incomplete)]


def print_version(ctx: click.Context, _param, value: bool) -> None:
    """tdxvirt's version, libvirt's client library, and the daemon at the URI (or why not)."""
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import version

    lines = [f"tdxvirt {version('tdxvirt')}"]
    try:
        import libvirt

        lines.append(f"libvirt library {_dotted(libvirt.getVersion())}")
        from ..virt.conn import open_connection

        session = _session(ctx)
        try:
            conn = open_connection(session.uri)
            try:
                lines.append(f"libvirt daemon {_dotted(conn.getLibVersion())} at {session.uri}")
            finally:
                conn.close()
        except Exception as error:  # --version still answers without a daemon
            lines.append(f"libvirt daemon: not reachable at {session.uri} ({error})")
    except ImportError:
        lines.append("libvirt library: not installed (Debian/Ubuntu: python3-libvirt; pip: libvirt-python)")
    click.echo("\n".join(lines))
    ctx.exit(0)


def _dotted(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
