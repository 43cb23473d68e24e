"""Writes the output of `jaxgen configs list --markdown` between the README's configs markers.

    python experiments/update_readme.py

tests/test_readme.py fails when the README's table and the configs disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

from jaxgen.tools import catalog

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- configs:begin -->\n)(.*?)(<!-- configs:end -->)", re.S)


def render(text: str) -> str:
    """README text with the generated configs table between the markers."""
    table = catalog.list_configs(None, "markdown").strip() + "\n"
    if not BLOCK.search(text):
        raise ValueError("README.md has no <!-- configs:begin --> ... <!-- configs:end --> block")
    return BLOCK.sub(lambda m: m.group(1) + table + m.group(3), text)


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    print(f"updated {README}")
