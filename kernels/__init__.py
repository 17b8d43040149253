"""Sparse weight formats and Triton GEMM kernels, installed as ``llmsparse.kernels``.

``formats`` (pure torch) defines the compressed layouts; ``ops`` (needs Triton, imported lazily) runs
``y = x @ W.T + b`` straight from them; ``library`` wraps that as the custom op ``llmsparse::sparse_linear``.
"""

if __name__ == "llmsparse.kernels":
    from .formats import BalancedWeight, BitmapWeight, NMWeight, SparseWeight, compress, from_tensors

    __all__ = ["BalancedWeight", "BitmapWeight", "NMWeight", "SparseWeight", "compress", "from_tensors"]
else:
    # Imported as a top-level ``kernels`` because the repository root is on sys.path (``python -m pytest`` run
    # from it). That name belongs to the Hugging Face package, which transformers imports when it is installed:
    # load that package in our place, so the import gets what it asked for.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _package = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _package
        _spec.loader.exec_module(_package)
