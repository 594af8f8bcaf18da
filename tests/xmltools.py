"""Comparing domain XML as libvirt reads it back with what tdxvirt rendered."""

from __future__ import annotations

from lxml import etree


def _text(element) -> str:
    return (element.text or "").strip()


def _same_attribute(key: str, dumped: str | None, rendered: str) -> bool:
    # libvirt's qemu driver expands the machine alias q35 to its versioned name.
    if key == "machine" and rendered == "q35" and dumped is not None:
        return dumped == "q35" or dumped.startswith("pc-q35-")
    return dumped == rendered


def _covers(dumped, rendered) -> bool:
    """``dumped`` has rendered's tag, attributes, text, and (recursively) children."""
    if dumped.tag != rendered.tag or _text(dumped) != _text(rendered):
        return False
    if not all(_same_attribute(k, dumped.get(k), v) for k, v in rendered.attrib.items()):
        return False
    return all(any(_covers(d, r) for d in dumped if isinstance(d.tag, str))
               for r in rendered if isinstance(r.tag, str))


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def dropped_elements(rendered_xml: str, dumped_xml: str, test_driver: bool = False) -> list[str]:
    """Paths of rendered elements that libvirt's read-back lacks or changed.

    libvirt's test driver does not keep the qemu driver's ``<qemu:commandline>``
    namespace; with ``test_driver`` those elements are not counted (the real qemu
    driver's read-back is checked for them separately).
    """
    rendered = etree.fromstring(rendered_xml.encode())
    dumped = etree.fromstring(dumped_xml.encode())
    if test_driver:
        for element in rendered.findall(f"{{{QEMU_NS}}}commandline"):
            rendered.remove(element)
    tree = rendered.getroottree()
    return [tree.getpath(r) for r in rendered.iter()
            if isinstance(r.tag, str) and r is not rendered
            and not any(_covers(d, r) for d in dumped.iter(r.tag))]
