"""Render a :class:`~pipeline.domain.model.Domain` to libvirt domain XML (deterministic bytes)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from pipeline.domain.model import Domain


def render(domain: Domain) -> str:
    """Return the domain XML as text, two-space indented, ending with a newline.

    The same model always renders to the same string: child order is fixed by the model and
    ElementTree keeps attribute insertion order.
    """
    root = domain.to_element()
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"
