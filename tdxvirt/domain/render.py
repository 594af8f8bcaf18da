"""Turn a DomainPlan into domain XML through the autoescaped templates in domains/."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

from .domainxml import AGENT_CHANNEL_NAME, NAMESPACE
from .policy import DomainPlan


@lru_cache(maxsize=1)
def _templates() -> Path:
    # the tdxvirt.domains package's directory, wherever the install put it (the
    # editable one maps it to the top-level domains/); importlib.resources would cost
    # a define ~3 ms of imports for the same path, and tdxvirt never runs from a zip
    from importlib.util import find_spec

    spec = find_spec("tdxvirt.domains")
    return Path(next(iter(spec.submodule_search_locations)))


def _load(name: str) -> str:
    return (_templates() / name).read_text()


class _StateDirBytecodeCache(jinja2.BytecodeCache):
    """The templates' compiled code kept in tdxvirt's cache (tdxvirt.cache: root's own
    state directory for root), keyed by Jinja from the template's name and source, so
    an edited template is compiled afresh; a define no longer compiles them each run."""

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        from .. import cache

        data = cache.read("jinja", bucket.key)
        if data is not None:
            import io

            bucket.load_bytecode(io.BytesIO(data))

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        import io

        from .. import cache

        out = io.BytesIO()
        bucket.write_bytecode(out)
        cache.write("jinja", bucket.key, out.getvalue())


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        autoescape=True,  # the templates are the only place XML text is written
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        bytecode_cache=_StateDirBytecodeCache(),
    )


def render_domain(plan: DomainPlan, template: str = "td.xml.j2") -> str:
    return _environment().get_template(template).render(plan=plan, namespace=NAMESPACE,
                                                         agent_channel=AGENT_CHANNEL_NAME)


def render_run_marker(started: float) -> str:
    """The live metadata element recording when tdxvirt started a domain."""
    return _environment().get_template("run-marker.xml.j2").render(started=f"{started:.0f}")
