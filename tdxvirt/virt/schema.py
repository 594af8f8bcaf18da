"""Validate domain XML against libvirt's own RelaxNG schema (domain.rng).

The schema is loaded once per process. The first directory whose schema knows TDX
launch security is used; a host whose only schemas predate TDX cannot check a TD
locally, and then libvirt's VIR_DOMAIN_DEFINE_VALIDATE (the same schema, in the
daemon) is the check.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lxml import etree

from ..errors import TdxvirtError
from ..paths import schema_dirs


def _knows_tdx(directory: Path) -> bool:
    try:
        return "launchSecurityTDX" in (directory / "domaincommon.rng").read_text()
    except OSError:
        return False


def find_schema_dir() -> Path | None:
    return next((d for d in schema_dirs() if _knows_tdx(d)), None)


@lru_cache(maxsize=4)
def _relaxng(domain_rng: Path) -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(domain_rng)))


def validate_domain_xml(xml: str, schema_dir: Path | None = None) -> bool:
    """Raise when the XML breaks libvirt's schema; return False when none was found."""
    schema_dir = schema_dir or find_schema_dir()
    if schema_dir is None:
        return False
    schema = _relaxng(schema_dir / "domain.rng")
    document = etree.fromstring(xml.encode())
    if not schema.validate(document):
        error = schema.error_log.last_error
        # Rendered XML breaking the schema is tdxvirt's bug, not the user's input.
        raise TdxvirtError(
            f"internal error: generated domain XML fails libvirt's schema at line "
            f"{error.line}: {error.message}; please report this with the command used"
        )
    return True
