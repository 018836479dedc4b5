"""The examples in the public docstrings run and print what they say."""

import doctest
import inspect

import numpy as np
import pytest

import softxent as sx
from softxent import numpy_api


@pytest.mark.parametrize("module", [numpy_api])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, extraglobs={"np": np, "sx": sx}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", sx.__all__)
def test_every_public_function_has_a_docstring_with_math(name):
    obj = getattr(sx, name)
    if inspect.isfunction(obj):
        assert obj.__doc__ and len(obj.__doc__) > 200
    elif inspect.isclass(obj):
        assert obj.__doc__ and len(obj.__doc__) > 40
