"""Sparse execution: ``SparseLinear`` (a Linear holding a compressed weight, run by ``llmsparse.kernels``), and
``sparsify``/``densify``, which swap such modules in and out of a model."""
