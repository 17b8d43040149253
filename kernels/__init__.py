"""Sparse weight formats and Triton GEMM kernels, installed as ``llmsparse.kernels``.

``formats`` (pure torch) defines the compressed layouts; ``ops`` (needs Triton, imported lazily) runs
``y = x @ W.T + b`` straight from them.
"""

from .formats import BitmapWeight, NMWeight, SparseWeight, compress, from_tensors

__all__ = ["BitmapWeight", "NMWeight", "SparseWeight", "compress", "from_tensors"]
