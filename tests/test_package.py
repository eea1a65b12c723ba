"""The package's public names: each method's function and its module are different names."""

from __future__ import annotations

import importlib
import importlib.util
import types


def test_method_functions_do_not_hide_their_modules():
    import vcl_jax.continual as continual

    for fn, module in (("vcl", "variational"), ("mle", "sequential"), ("ewc", "consolidation")):
        assert callable(getattr(continual, fn)) and not isinstance(getattr(continual, fn),
                                                                   types.ModuleType)
        mod = importlib.import_module(f"vcl_jax.continual.{module}")
        assert isinstance(mod, types.ModuleType) and getattr(mod, fn) is getattr(continual, fn)
        assert importlib.util.find_spec(f"vcl_jax.continual.{fn}") is None  # no such module
