"""Sparse weight formats and Triton GEMM kernels, installed as ``llmsparse.kernels``."""
