"""Jinja2 templates of the domains tdxvirt defines (installed as tdxvirt.domains)."""
