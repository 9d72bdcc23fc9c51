"""Triton kernels of diffattn and their launchers (installed as ``diffattn.kernels``).

Importing this package imports ``triton``; the rest of diffattn imports it only when a
kernel is launched.
"""

if __name__ == "kernels":
    # This folder was found under the top-level name ``kernels``: the repository root is on
    # sys.path (``python -c``, a REPL or notebook started there, ``python -m pytest``). That name
    # belongs to the PyPI package ``kernels`` that transformers imports (``from kernels import
    # CUDAProperties``); this folder is installed only as ``diffattn.kernels``. So the installed
    # ``kernels`` is loaded in its place (a module may replace itself in sys.modules), or the
    # import fails and says why; diffattn's kernels never run under this name.
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec

    def _real_kernels_spec():
        def real(entry):
            try:
                return _os.path.realpath(entry or _os.curdir)
            except (TypeError, ValueError):
                return None

        mine = real(__file__)
        root = _os.path.dirname(_os.path.dirname(mine))
        path = [entry for entry in _sys.path if real(entry) != root]
        for finder in _sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(__name__, path if finder is _PathFinder else None)
            if spec is not None and spec.loader is not None and (spec.origin is None or real(spec.origin) != mine):
                return spec
        return None

    _spec = _real_kernels_spec()
    if _spec is None:
        raise ImportError(
            f"'kernels' resolved to diffattn's kernels folder ({_os.path.dirname(_os.path.abspath(__file__))}) because "
            "the diffattn repository root is on sys.path, and no installed 'kernels' package was found: import it as "
            "'diffattn.kernels', or start Python from another directory", name=__name__)
    _module = _module_from_spec(_spec)
    _sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
else:
    from .ops import (
        MAX_HEAD_DIM,
        block_sparse_attention,
        block_sparse_partials,
        interpreting,
        kernel_block_size,
        launch,
        launch_config,
        merge_partials,
        piecewise_attention,
    )

    __all__ = ["MAX_HEAD_DIM", "block_sparse_attention", "block_sparse_partials", "interpreting", "kernel_block_size",
               "launch", "launch_config", "merge_partials", "piecewise_attention"]
