"""Layer allocation plug-ins: how the target sparsity is spread over the decoder layers (one file here and one
line below)."""

from ..registry import Registry

ALLOCATIONS = Registry(__name__, "allocation", {
    "uniform": "base:Uniform",
    "owl": "owl:OWL",
})
