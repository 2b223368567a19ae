"""Sphinx hooks: the measured tables the pages ``{include}``, and references by any public path.

At the start of every build, :func:`benchmarks.tables.write` renders every results file
(``benchmarks/results/*.json``, the FPDM sweep's ``examples/fpdm/results/``) into
``docs/_generated/<snippet>.md`` and copies the sweep's plots there. It reads the files only: a build never
runs a benchmark, and a missing file gives a marked box instead of a table.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
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


def _owner_has(owner: Any, attr: str) -> bool:
    """Whether the class ``owner`` has ``attr``: a member, a dataclass field or an annotated attribute."""
    if not isinstance(owner, type):
        return False
    fields = getattr(owner, "__dataclass_fields__", {})
    annotated = {
        name
        for klass in owner.__mro__
        for name in getattr(klass, "__annotations__", {})
    }
    described = (
        re.search(rf"^\s*{re.escape(attr)}\s*:", owner.__doc__ or "", flags=re.M)
        is not None
    )
    return hasattr(owner, attr) or attr in fields or attr in annotated or described


def _candidates(node: Any, documented: Iterable[str]) -> list[str]:
    """The full names a reference may mean: as written, in its class, in its module, then by its
    short name when exactly one documented object has it (a summary line with no module in scope)."""
    target = node.get("reftarget", "").lstrip("~.")
    module, klass = node.get("py:module"), node.get("py:class")
    names = [target]
    if module and klass:
        names.append(f"{module}.{klass}.{target}")
    if module:
        names.append(f"{module}.{target}")
    if "." not in target:
        same = [name for name in documented if name.rpartition(".")[2] == target]
        if len({id(_import(name)) for name in same}) == 1:
            names.append(min(same, key=len))
    return [name for name in names if name.startswith("implicitdiff.")]


def resolve_alias(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a reference by any public path, or from inside its module, to the documented entry.

    Every public object is documented once, under the name users import (``implicitdiff.Anderson``);
    docstrings and pages may refer to it by another public path (``implicitdiff.solvers.Anderson``) or by
    its short name from inside its module (``solve_chain`` in ``implicitdiff.chain``). An attribute that
    its class's docstring describes (an ``Attributes`` section makes no entry of its own) resolves to
    the class's entry.
    """
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    documented = dict(domain.objects)

    def link(name: str) -> Any:
        return domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], name, node, contnode
        )

    for target in _candidates(node, documented):
        if target in documented:
            return link(target)
        obj = _import(target)
        if obj is not None and callable(obj):
            for name in documented:
                if name.startswith("implicitdiff.") and _import(name) is obj:
                    return link(name)
        owner_name, _, attr = target.rpartition(".")
        owner = _import(owner_name)
        if owner is None or not _owner_has(owner, attr):
            continue
        for name in documented:
            parent, _, last = name.rpartition(".")
            if (
                last == attr
                and parent.startswith("implicitdiff.")
                and _import(parent) is owner
            ):
                return link(name)
        for name in documented:
            if name.startswith("implicitdiff.") and _import(name) is owner:
                return domain.resolve_xref(
                    env, node["refdoc"], app.builder, "class", name, node, contnode
                )
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", write_snippets)
    app.connect("missing-reference", resolve_alias)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
