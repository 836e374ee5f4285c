"""Sphinx configuration for qp2p's API reference (``make docs``; tests/loopback/test_docs.py
builds it with warnings as errors)."""

from __future__ import annotations

import qp2p

project = "qp2p"
author = "qp2p developers"
release = version = qp2p.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}  # offline: no inventories fetched
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
exclude_patterns = ["_build", "pypi.md"]
html_theme = "alabaster"
html_static_path: list[str] = []
