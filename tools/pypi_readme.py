"""Write docs/pypi.md, the long description on PyPI (pyproject's ``readme``), from README.md.

README.md opens with what a developer of qp2p runs (``make demo``); someone reading PyPI needs
what qp2p is, how to install it and a first program: README's "What it is" paragraph, its quick
example and its Install section, verbatim. ``tests/loopback/test_docs.py`` checks that
docs/pypi.md is what this script writes, so run it after editing those parts of README.md:

    python tools/pypi_readme.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TARGET = ROOT / "docs" / "pypi.md"
RUN_MARKER = "<!-- example: run -->\n"

TAIL = """## More

The README in the repository and in the sdist has the rest: features and defaults, the command
line, authentication with pinned peers or a private CA, NAT traversal, benchmarks, hardening
against hostile peers, and the limits. The API reference is built from the docstrings
(`make docs` in a checkout); changes are in `CHANGELOG.md`, how to report a vulnerability in
`SECURITY.md`.
"""


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end + 1 if end != -1 else len(text)].strip()


def render(readme: str) -> str:
    """docs/pypi.md's text for this README text."""
    what = _section(readme, "What it is")
    intro = what.split("\n\n")[1].strip()  # the paragraph under the heading
    example = what[what.index(RUN_MARKER) + len(RUN_MARKER) :]
    example = example[: example.index("\n```\n") + len("\n```")]
    return f"# qp2p\n\n{intro}\n\n{example}\n\n{_section(readme, 'Install')}\n\n{TAIL}"


def main() -> int:
    TARGET.write_text(render(README.read_text()))
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
