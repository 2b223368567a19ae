"""Sphinx hooks: the measured tables the pages ``{include}``, and references by any public path.

At the start of every build, :func:`benchmarks.tables.write` renders every results file
(``benchmarks/results/*.json``, the FPDM sweep's ``examples/fpdm/results/``) into
``docs/_generated/<snippet>.md`` and copies the sweep's plots there. It reads the files only: a build never
runs a benchmark, and a missing file gives a marked box instead of a table.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from benchmarks import tables
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def write_snippets(app: Sphinx) -> None:
    for path in tables.write(Path(app.srcdir) / "_generated"):
        logger.info("bench_tables: wrote %s", path.relative_to(app.srcdir))


def _import(dotted: str) -> Any:
    """The object a dotted name refers to (module prefix imported, the rest by getattr), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def resolve_alias(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a reference to ``implicitdiff.solvers.Anderson`` to the documented ``implicitdiff.Anderson``.

    Every public object is documented once, under the name users import; docstrings and pages may refer
    to it by any other public path, and this resolves such a reference to the documented entry.
    """
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("implicitdiff."):
        return None
    obj = _import(target)
    if obj is None or not callable(obj):
        return None
    domain = env.get_domain("py")
    for name in domain.objects:
        if name != target and name.startswith("implicitdiff.") and _import(name) is obj:
            fromdoc, reftype = node["refdoc"], node["reftype"]
            return domain.resolve_xref(
                env, fromdoc, app.builder, reftype, name, node, contnode
            )
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", write_snippets)
    app.connect("missing-reference", resolve_alias)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
