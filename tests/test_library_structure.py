"""The library's structure holds: short functions, declared protocols, arguments checked once."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from implicitdiff import DEQLayer, Picard, fixed_point
from implicitdiff.solvers import UpdateRule, iterate
from implicitdiff.solvers import _base as solver_base

PACKAGE = Path(__file__).resolve().parents[1] / "implicitdiff"

#: The getattr calls the package may make: none of them asks an object which protocol it follows.
ALLOWED_GETATTR = {
    ("_chainloop.py", "state"),  # reading the fields of a rule's dataclass state, to select their rows
    ("_implicit.py", "node"),  # an autograd node's leaf tensor, where it has one
    ("_boundmap.py", "f"),  # f's __name__, for error messages
}


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(body) > 1:
        first = body[1]  # the docstring does not count
    return node.end_lineno - first.lineno + 1


def test_no_function_body_in_the_library_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _functions(ast.parse(path.read_text())):
            if _body_lines(node) > 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({_body_lines(node)} lines)")
    assert not long, long


def test_getattr_is_never_used_to_discover_a_protocol():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id
                in {
                    "getattr",
                    "hasattr",
                }
            ):
                target = node.args[0]
                found.add((path.name, target.id if isinstance(target, ast.Name) else ast.unparse(target)))
    assert found <= ALLOWED_GETATTR, found - ALLOWED_GETATTR


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = solver_base.check_solve_args

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("implicitdiff") and getattr(module, "check_solve_args", None) is real:
            monkeypatch.setattr(module, "check_solve_args", counting)
    return calls


@pytest.mark.parametrize("needs_grad", [False, True])
def test_the_solve_arguments_are_checked_once_per_layer_call(monkeypatch, needs_grad):
    lin = torch.nn.Linear(4, 4)
    deq = DEQLayer(lambda z, x: torch.tanh(0.5 * lin(z) + x), max_iter=20, tol=1e-5)
    x = torch.randn(3, 4, requires_grad=needs_grad)
    calls = _count_checks(monkeypatch)
    with torch.set_grad_enabled(needs_grad):
        deq(x)
    assert len(calls) == 1
    deq(x, max_iter=10, tol=1e-3)  # overrides are checked by the one check too
    assert len(calls) == 2


def test_bad_overrides_are_still_refused_clearly():
    deq = DEQLayer(lambda z, x: 0.5 * z + x)
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="max_iter must be an int >= 1, got str '5'"):
        deq(x, max_iter="5")
    with pytest.raises(ValueError, match="tol must be a finite float > 0"):
        deq(x, tol=-1.0)
    with pytest.raises(ValueError, match="stop_mode must be one of"):
        fixed_point(lambda z, x: 0.5 * z + x, x, stop_mode="max")


def test_a_rule_declares_its_optional_parts_by_defining_them():
    class Plain(UpdateRule):
        def step(self, state, z, fz, residual):
            return fz, state

    class Trial(Plain):
        def accept(self, state, residual, trial_residual):
            return trial_residual <= residual, state

    class Forgetful(Plain):
        def restart(self, state, mask):
            return state

    assert not Plain.judges_trials and not Plain.can_restart
    assert Trial.judges_trials and not Trial.can_restart
    assert Forgetful.can_restart and not Forgetful.judges_trials
    assert not Picard.judges_trials


def test_an_object_with_init_and_step_is_a_rule_and_anything_else_is_refused():
    class Duck:
        def init(self, z: Tensor, fz: Tensor) -> None:
            return None

        def step(self, state: None, z: Tensor, fz: Tensor, residual: Tensor | None) -> tuple[Tensor, None]:
            return fz, state

    out = iterate(Duck(), lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), max_iter=60, tol=1e-6)
    assert out.all_converged
    with pytest.raises(TypeError, match="rule must be an update rule with init"):
        iterate(object(), lambda z: z, torch.zeros(2, 3), max_iter=3, tol=None)


def _solver_classes() -> dict[str, str]:
    """Each solver class of the library (update rules, chain rules, wrappers) and the module defining it."""
    import implicitdiff
    import implicitdiff.solvers

    classes = {}
    for module in (implicitdiff, implicitdiff.solvers):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and (issubclass(value, UpdateRule) or hasattr(value, "propose")):
                classes[name] = value.__module__
    classes["Captured"] = "implicitdiff.solvers.captured"
    return classes


def test_no_module_tests_for_the_librarys_solver_classes_outside_their_own_module():
    # Capabilities are declared (judges_trials, can_restart, per_sample_history, reads_chain) and read
    # from the object; isinstance on our own classes would leave a user's rule out.
    classes = _solver_classes()
    assert {"Picard", "Anderson", "Broyden", "ChainSecant", "UpdateRule", "Captured"} <= set(classes)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "implicitdiff." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in {"isinstance", "issubclass"} or len(node.args) != 2:
                continue
            target = node.args[1]
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            for name in names:
                label = name.attr if isinstance(name, ast.Attribute) else getattr(name, "id", None)
                if label in classes and classes[label] != module.removesuffix(".__init__"):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.func.id}(..., {label})")
    assert not found, found
