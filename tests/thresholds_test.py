"""The threshold grid is the PyTorch reference's ``torch.linspace(0, 1, 100)``, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from medcode_jax import thresholds

torch = pytest.importorskip("torch")


def _bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def test_default_grid_is_torch_linspace_bit_for_bit():
    grid = thresholds.DEFAULT_THRESHOLDS
    assert grid.dtype == np.float32 and grid.shape == (100,)
    reference = torch.linspace(0, 1, 100)
    assert reference.dtype == torch.float32
    np.testing.assert_array_equal(_bits(grid), _bits(reference.numpy()))
    # what np.linspace would give instead: one ulp off at index 67
    assert np.linspace(0, 1, 100).astype(np.float32)[67] != grid[67]
    assert float(grid[67]) == 0.6767677068710327


@pytest.mark.parametrize("start, end, steps", [(0, 1, 2), (0, 1, 7), (0, 1, 1000), (0.1, 0.9, 33),
                                               (-1, 3, 101), (0, 1, 1)])
def test_torch_linspace_float32_other_grids(start, end, steps):
    np.testing.assert_array_equal(_bits(thresholds.torch_linspace_float32(start, end, steps)),
                                  _bits(torch.linspace(start, end, steps).numpy()))


def test_module_does_not_import_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(thresholds))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in getattr(node, "names", [])}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in imported
