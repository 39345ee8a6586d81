"""``TARGET`` of ``taskorch run`` (and ``taskorch demo``): ``module:function`` or
``path/to/file.py:function`` -> the function, and how it travels to the workers (parent
process, the main thread, before any worker starts).

By reference (cloudpickle's default for a module-level function: the workers import its
module) when the module is installed; by value (``cloudpickle.register_pickle_by_value``: the
function's code travels with each call) when it is not: a file named by path, or a module found
only in the current directory, which a Dask cluster's workers (or a ``taskorch serve``
elsewhere) could not import. While any module is registered by value, ``_wire`` does not cache
pickles by reference (a few microseconds more per call).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from taskorch.cli.options import UsageError


def resolve_target(spec: str, local_dirs: list[str] | None = None) -> Callable[..., Any]:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function.

    A module named by path need not be on sys.path: it is imported under a private name and
    its functions travel to the workers by value (cloudpickle), so the workers never need to
    import it. The current directory is put on sys.path, as ``python -m`` does, so that
    ``module:function`` finds a module beside the user; such a module is not installed (the
    workers of a Dask cluster, or of a ``taskorch serve`` started elsewhere, cannot import it),
    so it travels by value too, with its whole top-level package. An installed one (found
    without the current directory: site-packages, an editable install, PYTHONPATH) travels by
    reference, as any function does: the workers import it. ``local_dirs`` (``--path``) are
    treated as the current directory is: a module found only there travels by value.
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise UsageError(
            f"TARGET must be package.module:function or path/to/file.py:function, got {spec!r}"
        )
    module: ModuleType
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise UsageError(f"TARGET file {str(path)!r} does not exist")
        name = f"taskorch_target_{abs(hash(str(path.resolve())))}"
        spec_ = importlib.util.spec_from_file_location(name, path)
        if spec_ is None or spec_.loader is None:
            raise UsageError(f"cannot import {str(path)!r}")
        module = importlib.util.module_from_spec(spec_)
        sys.modules[name] = module
        try:
            spec_.loader.exec_module(module)
        except Exception as exc:
            raise UsageError(
                f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            raise UsageError(
                f"cannot import module {module_part!r}: {type(exc).__name__}: {exc}"
            ) from exc
        top = sys.modules.get(module_part.partition(".")[0])
        if top is not None and _found_only_in_the_current_directory(top, local_dirs):
            import cloudpickle

            cloudpickle.register_pickle_by_value(top)  # and so every submodule
    fn = module
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            raise UsageError(f"{module_part!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise UsageError(f"TARGET {spec!r} is not callable")
    return fn


def _found_only_in_the_current_directory(
    top: ModuleType, local_dirs: list[str] | None = None,
) -> bool:
    """Whether the top-level module or package ``top`` was imported from the current
    directory (or one of ``local_dirs``) and would not be found without them (the import
    system's finders asked again, sys.path without them), nor is part of an editable install."""
    if getattr(top, "__file__", None) is None:
        return False  # built in, frozen, or a namespace package: leave it by reference
    local = {os.path.realpath(d) for d in [os.getcwd(), *(local_dirs or [])]}
    origin = os.path.realpath(top.__file__ or "")
    if not any(origin.startswith(d + os.sep) for d in local) or _in_an_editable_install(origin):
        return False
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) not in local]
    for finder in sys.meta_path:
        try:
            if finder is importlib.machinery.PathFinder:
                spec = importlib.machinery.PathFinder.find_spec(top.__name__, elsewhere)
            else:  # editable installs, built-in and frozen modules
                find = getattr(finder, "find_spec", None)
                spec = find(top.__name__, None) if find is not None else None
        except Exception:
            continue
        if spec is not None:
            return False
    return True


def _in_an_editable_install(path: str) -> bool:
    """Whether ``path`` lies in the source tree of a distribution installed in editable mode
    (``pip install -e``: its ``direct_url.json``, PEP 610), found through a .pth entry that
    may be the current directory itself."""
    import importlib.metadata
    from urllib.parse import unquote, urlparse

    for dist in importlib.metadata.distributions():
        try:
            info = json.loads(dist.read_text("direct_url.json") or "{}")
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or not (info.get("dir_info") or {}).get("editable"):
            continue
        url = urlparse(str(info.get("url", "")))
        if url.scheme == "file":
            root = os.path.realpath(unquote(url.path))
            if path.startswith(root + os.sep):
                return True
    return False
