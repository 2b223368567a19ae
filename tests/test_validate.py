"""Argument checks shared by the package: one clear error per bad value, the same at every entry point."""

from __future__ import annotations

import warnings

import pytest
import torch

from implicitdiff import IFT, JFB, Anderson, ChainSecant, DEQLayer, Picard, fixed_point, solve_chain
from implicitdiff._validate import renamed_argument, warn_caller
from implicitdiff.solvers import Captured

ENTRY_POINTS = {
    "DEQLayer(solver=)": lambda cls: DEQLayer(lambda z, x: z, solver=cls),
    "DEQLayer(grad=)": lambda cls: DEQLayer(lambda z, x: z, grad=cls),
    "DEQLayer(f)": lambda cls: DEQLayer(cls),
    "layer call solver=": lambda cls: DEQLayer(lambda z, x: z)(torch.zeros(1, 2), solver=cls),
    "fixed_point(solver=)": lambda cls: fixed_point(lambda z, x: z, torch.zeros(1, 2), solver=cls),
    "fixed_point(grad=)": lambda cls: fixed_point(lambda z, x: z, torch.zeros(1, 2), grad=cls),
    "IFT(solver=)": lambda cls: IFT(solver=cls),
    "Captured(solver)": lambda cls: Captured(cls),
    "solve_chain(solver=)": lambda cls: solve_chain(lambda k, z: z, torch.zeros(2), 3, solver=cls),
}
CLASSES = {
    "DEQLayer(solver=)": Anderson,
    "DEQLayer(grad=)": IFT,
    "DEQLayer(f)": torch.nn.Linear,
    "layer call solver=": Picard,
    "fixed_point(solver=)": Anderson,
    "fixed_point(grad=)": JFB,
    "IFT(solver=)": Anderson,
    "Captured(solver)": Anderson,
    "solve_chain(solver=)": ChainSecant,
}


@pytest.mark.parametrize("where", list(ENTRY_POINTS))
def test_a_class_passed_for_an_instance_is_refused_at_once_naming_the_fix(where):
    cls = CLASSES[where]
    with pytest.raises(TypeError, match=rf"got the class {cls.__name__}: pass {cls.__name__}\(\)"):
        ENTRY_POINTS[where](cls)


def test_a_renamed_argument_still_arrives_with_a_warning_at_the_callers_line():
    @renamed_argument("old", "new")
    def fn(a: int, new: int = 0) -> int:
        return a + new

    with pytest.warns(DeprecationWarning, match=r"fn\(old=\.\.\.\) is deprecated") as caught:
        assert fn(1, old=2) == 3
    assert caught[0].filename == __file__
    with pytest.raises(TypeError, match="got new and old, its deprecated name: pass new only"):
        fn(1, new=2, old=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fn(1, new=2) == 3


def test_warn_caller_points_past_the_library_and_torch_frames():
    layer = DEQLayer(lambda z, x, scale: scale * z + x)
    with pytest.warns(DeprecationWarning) as caught:
        layer(torch.zeros(2, 3), scale=0.5)  # through Module.__call__ and the layer's forward
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning) as caught:
        warn_caller("direct", UserWarning)
    assert caught[0].filename == __file__
