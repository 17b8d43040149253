"""Pruning methods, each a small plug-in for the engine (see ``base.Method``): one file here and one line below."""

from ..registry import Registry

METHODS = Registry(__name__, "method", {
    "magnitude": "magnitude:Magnitude",
    "wanda": "wanda:Wanda",
    "sparsegpt": "sparsegpt:SparseGPT",
    "admm": "admm:ADMM",
})
DEFAULT_METHOD = "sparsegpt"
