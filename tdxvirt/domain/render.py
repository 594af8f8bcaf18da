"""Turn a DomainPlan into domain XML through the autoescaped templates in domains/."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import jinja2

from .domainxml import AGENT_CHANNEL_NAME, NAMESPACE
from .policy import DomainPlan


def _load(name: str) -> str:
    return resources.files("tdxvirt.domains").joinpath(name).read_text()


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        autoescape=True,  # the templates are the only place XML text is written
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_domain(plan: DomainPlan, template: str = "td.xml.j2") -> str:
    return _environment().get_template(template).render(plan=plan, namespace=NAMESPACE,
                                                         agent_channel=AGENT_CHANNEL_NAME)


def render_run_marker(started: float) -> str:
    """The live metadata element recording when tdxvirt started a domain."""
    return _environment().get_template("run-marker.xml.j2").render(started=f"{started:.0f}")
