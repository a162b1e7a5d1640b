"""Manners: honour the opt-out signals that servers send with images.

``X-Robots-Tag`` carries directives for all agents (``X-Robots-Tag: noai``) or
for one (``X-Robots-Tag: imgdl: noimageai``); it may come several times and
hold several comma-separated directives. An image whose response carries one
of the configured directives, for every agent or for our token, is not kept
(reason ``opted_out``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Directives that take a value after a colon; "name: value" is not an agent prefix.
_VALUED = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
# "none" is the robots standard's shorthand for "noindex, nofollow".
_SYNONYMS = {"none": ("noindex", "nofollow")}
_AGENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*:\s*(.*)$")


def opted_out(headers: Iterable[str], directives: frozenset[str], token: str) -> str | None:
    """The first opt-out directive that applies to us, or None."""
    if not directives:
        return None
    token = token.lower()
    for value in headers:
        agent = None
        match = _AGENT.match(value)
        if match and match.group(1).lower() not in _VALUED:
            agent, value = match.group(1).lower(), match.group(2)
        if agent not in (None, token, "*"):
            continue
        for directive in value.split(","):
            name = directive.strip().lower()
            for meaning in _SYNONYMS.get(name, (name,)):
                if meaning in directives:
                    return f"{agent}: {name}" if agent else name
    return None
