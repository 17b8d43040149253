"""Which targeted modules of a decoder layer write into the residual stream (o_proj, down_proj, GPT-2's c_proj,
OPT's out_proj and fc2), found from the autograd graph of one forward, not from module names: their input is
computed from other targeted modules' outputs only, while q/k/v or gate/up read the (normalised) residual stream,
which reaches back to the layer's input without passing through a module.

Dense-teacher targets belong on the residual writers: a module that reads the residual stream would correct the
upstream drift that the writer after it corrects again.
"""

from __future__ import annotations

import torch


def consumers(forward, hidden: torch.Tensor, modules: dict) -> set[str]:
    """The names among ``modules`` whose input, in ``forward(hidden)``, depends on other modules' outputs and on
    the layer's input only through them.

    ``hidden`` is copied with gradients enabled, so every tensor the layer computes carries its autograd node
    whatever the parameters' ``requires_grad``. From each module's input node the graph is searched backwards,
    stopping at other modules' outputs: the module writes into the residual stream when such an output is found
    and the layer's input is not.
    """
    inputs, outputs, handles = {}, {}, []

    def record(name):
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0].grad_fn, getattr(out, "grad_fn", None)
        return hook

    for name, module in modules.items():
        if isinstance(module, torch.nn.Module):  # fused-expert slices have no module of their own
            handles.append(module.register_forward_hook(record(name)))
    leaf = hidden.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            forward(leaf)
    finally:
        for h in handles:
            h.remove()
    produced = {node: name for name, node in outputs.items() if node is not None}
    found = set()
    for name, start in inputs.items():
        stack, seen, reads_module, reads_input = [start], set(), False, False
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in produced and produced[node] != name:
                reads_module = True
                continue
            if getattr(node, "variable", None) is leaf:
                reads_input = True
                break
            stack.extend(next_node for next_node, _ in node.next_functions)
        if reads_module and not reads_input:
            found.add(name)
    return found
