"""The checker helpers pass on right answers and explain wrong ones."""

import pytest
import torch
from conftest import tiny_llama

from course_utils import checks, surgery
from course_utils.models import count_parameters


def test_check_shape_and_close():
    checks.check_shape(torch.zeros(2, 3), (2, 3))
    with pytest.raises(AssertionError, match=r"has shape \(2, 3\), expected \(3, 2\)"):
        checks.check_shape(torch.zeros(2, 3), (3, 2))
    checks.check_close(torch.ones(3), torch.ones(3) + 1e-7)
    with pytest.raises(AssertionError, match="differs from the expected values by up to 0.5"):
        checks.check_close(torch.ones(3), torch.tensor([1.0, 1.5, 1.0]))


def test_check_params_reduced():
    model = tiny_llama()
    before = count_parameters(model)
    with pytest.raises(AssertionError, match="expected a reduction"):
        checks.check_params_reduced(model, before)
    surgery.prune_mlp(model, 0.5, method="l2")
    assert checks.check_params_reduced(model, before, at_least=0.1) > 0.1
    with pytest.raises(AssertionError, match="at least 90%"):
        checks.check_params_reduced(model, before, at_least=0.9)
