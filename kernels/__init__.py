"""Sparse weight formats and Triton GEMM kernels, installed as ``llmsparse.kernels``.

``formats`` (pure torch) defines the compressed layouts; ``ops`` (needs Triton, imported lazily) runs
``y = x @ W.T + b`` straight from them.
"""

# With the repository root on sys.path (``python -m pytest``) this folder is also importable as a top-level
# ``kernels``, a name transformers probes (by importing it) for the unrelated Hugging Face package; stay empty then.
if __name__ == "llmsparse.kernels":
    from .formats import BitmapWeight, NMWeight, SparseWeight, compress, from_tensors

    __all__ = ["BitmapWeight", "NMWeight", "SparseWeight", "compress", "from_tensors"]
