"""Lazy loader for the ``megavlm._C`` CUDA extension.

``load()`` returns the module or None (never raises); ``error()`` says why it
could not be imported. Set ``MEGAVLM_EXT_PATH=/path/to/_C....so`` to load a
build from outside the package (e.g. one made by ``build_extension`` into a
temporary folder).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading

_lock = threading.Lock()
_loaded = False
_module = None
_error: str | None = None


def _import():
    path = os.environ.get("MEGAVLM_EXT_PATH")
    if path:
        spec = importlib.util.spec_from_file_location("megavlm._C", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load megavlm._C from MEGAVLM_EXT_PATH={path!r}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["megavlm._C"] = mod
        return mod
    return importlib.import_module("megavlm._C")


def load():
    """The extension module, or None if it is not built / not importable."""
    global _loaded, _module, _error
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            try:
                _module = _import()
                _error = None
            except Exception as exc:  # ImportError, OSError (bad .so), ...
                _module = None
                _error = f"{type(exc).__name__}: {exc}"
            _loaded = True
    return _module


def error() -> str | None:
    load()
    return _error


def require():
    """The extension module; RuntimeError explaining how to build it otherwise."""
    mod = load()
    if mod is None:
        raise RuntimeError(
            f"megavlm._C is not available ({_error}); build it with `python -m megavlm._build` "
            "(needs nvcc and pybind11)"
        )
    return mod


def set_module(module) -> None:
    """Testing hook: use ``module`` (or None to force a reload on next use)."""
    global _loaded, _module, _error
    with _lock:
        _module = module
        _error = None
        _loaded = module is not None
