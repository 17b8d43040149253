"""A dense gated FFN split into a shared expert, routed experts and a linear router (what ``llmsparse moefy`` builds).

Self-contained on purpose (torch only): llmsparse runs this module in memory and copies this very file into every
export folder, so a model loaded with ``transformers`` (``trust_remote_code=True``) executes the same code.

Semantics of ``MoeFFN`` for a token x with chosen routed experts T (the ``top_k`` largest router scores):

    y = shared(x) + sum_{e in T} expert_e(x) + offset,    expert_e(x) = down_e(act(gate_e x) * up_e x) + b_e

Every chosen expert has weight exactly 1. While training (``llmsparse.moe.finetune``) the weight is written
``exp(s_e - sg(s_e))`` with s_e the router score and sg a stop-gradient: still exactly 1, but the loss reaches the
router through it (d weight / d s_e = 1), which top-k selection alone would not let it. With
``offset = -sum_e b_e`` (the dropped-expert compensation, see ``llmsparse.moe.convert``) an expert that is not
chosen contributes its calibration mean ``-b_e`` instead of nothing, and with every expert chosen ``y`` is the dense
FFN output again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPEC_KEY = "llmsparse_moe"


class GatedExpert(nn.Module):
    """A group of the dense FFN's neurons: ``down(act(gate(x)) * up(x))``, with an optional output bias."""

    def __init__(self, hidden_size: int, size: int, act_fn, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, size, bias=False)
        self.up_proj = nn.Linear(hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, hidden_size, bias=bias)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertRouter(nn.Module):
    """Linear expert scores ``W x + b`` computed in float32; plain parameters, so weight pruning never touches it."""

    def __init__(self, hidden_size: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), self.bias.float())


class MoeFFN(nn.Module):
    """Shared expert (always on) plus ``top_k`` of the routed experts per token, each with unit weight."""

    def __init__(self, hidden_size: int, shared_size: int, expert_sizes, top_k: int, act_fn, compensate: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.top_k = int(top_k)
        self.shared = GatedExpert(hidden_size, shared_size, act_fn) if shared_size > 0 else None
        self.experts = nn.ModuleList(GatedExpert(hidden_size, int(s), act_fn, bias=compensate) for s in expert_sizes)
        self.router = ExpertRouter(hidden_size, len(self.experts))
        self.offset = nn.Parameter(torch.zeros(hidden_size)) if compensate else None

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Indices [tokens, k] of the experts each token runs (all of them when ``top_k`` covers every expert)."""
        count = len(self.experts)
        if self.top_k >= count:
            return torch.arange(count, device=x.device).expand(x.shape[0], count)
        return self.router(x).topk(self.top_k, dim=-1).indices

    def _training_gates(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor | None:
        """``exp(s - sg(s))`` of the chosen experts' scores while training with gradients, else None (weight 1)."""
        if not (self.training and torch.is_grad_enabled()) or self.top_k >= len(self.experts):
            return None
        scores = self.router(x).gather(1, chosen)
        return torch.exp(scores - scores.detach())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self.shared(x) if self.shared is not None else torch.zeros_like(x)
        if self.offset is not None:
            out = out + self.offset
        chosen = self.route(x)
        if len(self.experts):
            expert_of = chosen.reshape(-1)
            token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(chosen.shape[1])
            order = torch.argsort(expert_of, stable=True)
            token_of = token_of[order]
            gates = self._training_gates(x, chosen)
            gates = gates.reshape(-1)[order] if gates is not None else None
            counts = torch.bincount(expert_of, minlength=len(self.experts)).tolist()
            start = 0
            for expert, n in zip(self.experts, counts):
                if n:
                    tokens = token_of[start:start + n]
                    y = expert(x[tokens])
                    if gates is not None:
                        y = y * gates[start:start + n, None].to(y.dtype)
                    out.index_add_(0, tokens, y.to(out.dtype))
                start += n
        return out.reshape(shape)


def install_moe(model: nn.Module, spec: dict) -> None:
    """Replace the FFN of each decoder layer named in ``spec`` by an (uninitialised) ``MoeFFN`` of the recorded sizes.

    ``spec``: ``{"layers": "model.layers", "mlp": "mlp", "ffn": {"0": {"shared": n, "experts": [sizes], "top_k": k,
    "compensate": bool}, ...}}``. The activation function is taken from the FFN being replaced.
    """
    layers = model.get_submodule(spec["layers"])
    for index, entry in spec["ffn"].items():
        layer = layers[int(index)]
        dense = getattr(layer, spec["mlp"])
        hidden = dense.gate_proj.in_features if hasattr(dense, "gate_proj") else dense.hidden_size
        moe = MoeFFN(hidden, int(entry["shared"]), entry["experts"], int(entry["top_k"]), dense.act_fn,
                     bool(entry.get("compensate", False)))
        setattr(layer, spec["mlp"], moe)


def moe_classes(base_config: type, base_model: type, model_type: str) -> tuple[type, type]:
    """A config class and a causal-LM class that are ``base_config`` / ``base_model`` with every FFN listed in
    ``config.llmsparse_moe`` replaced by a ``MoeFFN`` (the classes an export's ``auto_map`` names)."""

    def __init__(self, config):
        base_model.__init__(self, config)
        install_moe(self, getattr(config, SPEC_KEY))

    config_class = type("LlmsparseMoeConfig", (base_config,), {"model_type": model_type, "__module__": __name__})
    model_class = type("LlmsparseMoeForCausalLM", (base_model,),
                       {"config_class": config_class, "__init__": __init__, "__module__": __name__})
    return config_class, model_class
