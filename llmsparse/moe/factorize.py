"""How one dense gated FFN is split into a shared expert, routed experts and a router: pure tensor functions (each
tested alone) and the factorisation built from them (the steps are described in ``convert``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import LlmsparseError
from .config import MoefyConfig
from .modeling import MoeFFN


def expert_sizes(width: int, experts: int) -> list[int]:
    """Sizes of ``experts`` groups covering ``width`` neurons, differing by at most one (largest first)."""
    base, extra = divmod(width, experts)
    return [base + (1 if i < extra else 0) for i in range(experts)]


def neuron_contributions(h: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """``|h_j(t)| · ‖W_down[:, j]‖``: how much neuron j can move the FFN output on token t. h: [tokens, width]."""
    return h.abs() * down_weight.float().norm(dim=0)


def balanced_assignment(cost: torch.Tensor, sizes) -> torch.Tensor:
    """Assign each row to a column so that column c receives exactly ``sizes[c]`` rows, cheaply (greedy).

    Pairs are taken in order of increasing cost; a pair is used when its row is free and its column has room.
    """
    n, k = cost.shape
    if sum(sizes) != n or len(sizes) != k:
        raise ValueError(f"sizes {list(sizes)} do not cover {n} rows in {k} columns")
    room = list(sizes)
    labels = [-1] * n
    left = n
    for flat in torch.argsort(cost.flatten().cpu(), stable=True).tolist():
        row, col = divmod(flat, k)
        if labels[row] < 0 and room[col] > 0:
            labels[row] = col
            room[col] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(points: torch.Tensor, sizes, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``points`` into ``len(sizes)`` clusters of exactly the given sizes (labels per row).

    k-means++ seeding from a seeded generator, then Lloyd iterations whose assignment step is
    ``balanced_assignment`` on squared distances; stops when the labels no longer change.
    """
    k = len(sizes)
    points = points.float()
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(points.shape[0], (1,), generator=gen))
    centres = [points[first]]
    closest = (points - points[first]).square().sum(1)
    for _ in range(1, k):
        probs = closest.cpu().double()
        pick = int(torch.multinomial(probs / probs.sum(), 1, generator=gen)) if probs.sum() > 0 else 0
        centres.append(points[pick])
        closest = torch.minimum(closest, (points - points[pick]).square().sum(1))
    centres = torch.stack(centres)
    labels = None
    for _ in range(iters):
        new = balanced_assignment(torch.cdist(points, centres).square(), sizes).to(points.device)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centres = torch.zeros_like(centres).index_add_(0, labels, points)
        centres /= torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1).to(points.dtype)
    return labels.cpu()


def expert_output_norms(h: torch.Tensor, down_weight: torch.Tensor, groups) -> torch.Tensor:
    """``‖W_down[:, g] h_g‖`` per token and neuron group g: [tokens, groups]."""
    down = down_weight.float()
    return torch.stack([(h[:, g] @ down[:, g].t()).norm(dim=1) for g in groups], dim=1)


def fit_linear(x: torch.Tensor, targets: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``targets ≈ x Wᵀ + b`` in closed form (float64); the ridge is relative to mean diag(XᵀX)."""
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
    design = torch.cat([x.double(), ones], dim=1)
    gram = design.t() @ design
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    solution = torch.linalg.solve(gram, design.t() @ targets.double())
    return solution[:-1].t().float().contiguous(), solution[-1].float().contiguous()


def top_k_hits(scores: torch.Tensor, reference: torch.Tensor, k: int) -> float:
    """Share of the reference's top-k entries (per row) that the scores' top-k also picks."""
    if k >= scores.shape[1]:
        return 1.0
    mine = scores.topk(k, dim=1).indices
    best = reference.topk(k, dim=1).indices
    return (mine.unsqueeze(2) == best.unsqueeze(1)).any(2).float().mean().item()


def chosen_mask(chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """Boolean [tokens, experts]: True where the token runs the expert."""
    return torch.zeros(chosen.shape[0], experts, dtype=torch.bool, device=chosen.device).scatter_(1, chosen, True)


def skipped_means(h: torch.Tensor, down_weight: torch.Tensor, groups, chosen: torch.Tensor) -> torch.Tensor:
    """Per expert, its mean output over the calibration tokens that skip it ([experts, hidden]; 0 if none skips)."""
    skips = (~chosen_mask(chosen, len(groups))).float()
    down = down_weight.float()
    out = torch.zeros(len(groups), down.shape[0], device=h.device)
    for e, g in enumerate(groups):
        count = skips[:, e].sum()
        if count > 0:
            out[e] = (skips[:, e] @ h[:, g]) @ down[:, g].t() / count
    return out


# ---------------------------------------------------------------------------------------------------------------
# One FFN


@dataclass
class Factorization:
    """How one FFN's neurons were split: shared neuron indices, routed groups, the router and the compensation."""

    shared: torch.Tensor
    groups: list[torch.Tensor]
    router_weight: torch.Tensor
    router_bias: torch.Tensor
    offsets: torch.Tensor | None
    stats: dict = field(default_factory=dict)


def find_ffn(layer: nn.Module) -> tuple[str, nn.Module]:
    """The gated FFN child of a decoder layer (an ``mlp`` with gate/up/down projections), by structure."""
    for name, child in layer.named_children():
        if all(isinstance(getattr(child, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")) \
                and hasattr(child, "act_fn"):
            return name, child
    kinds = ", ".join(type(c).__name__ for _, c in layer.named_children())
    raise LlmsparseError(f"moefy needs gated FFNs with gate_proj/up_proj/down_proj (Llama, Mistral, Qwen, Gemma); "
                         f"this decoder layer has {kinds}")


def check_ffn(ffn: nn.Module, experts: int) -> None:
    if any(getattr(ffn, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
        raise LlmsparseError("moefy supports FFNs without biases (gate/up/down projections with bias=False)")
    width = ffn.gate_proj.out_features
    if experts > width:
        raise LlmsparseError(f"--experts {experts} is more than the FFN's {width} neurons: use at most {width}")
    if float(ffn.act_fn(torch.zeros(1)).abs()) != 0.0:
        raise LlmsparseError(f"moefy needs an activation with act(0) = 0, not {type(ffn.act_fn).__name__}")


def factorize(ffn: nn.Module, x: torch.Tensor, config: MoefyConfig) -> Factorization:
    """Split one gated FFN from its calibration inputs ``x`` [tokens, hidden] (see the module docstring)."""
    gate, up, down = ffn.gate_proj.weight.float(), ffn.up_proj.weight.float(), ffn.down_proj.weight.float()
    x = x.float()
    h = ffn.act_fn(x @ gate.t()) * (x @ up.t())
    width = h.shape[1]
    sizes = expert_sizes(width, config.experts)
    n_shared = sum(sizes[:config.shared])
    routed_sizes = sizes[config.shared:]
    contrib = neuron_contributions(h, down)
    order = torch.argsort(contrib.mean(0), descending=True, stable=True)
    shared, rest = order[:n_shared].sort().values, order[n_shared:]
    profiles = contrib[:, rest].t()
    profiles = profiles / profiles.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = balanced_kmeans(profiles, routed_sizes, config.kmeans_iters, config.seed).to(rest.device)
    groups = [rest[labels == c].sort().values for c in range(len(routed_sizes))]

    norms = expert_output_norms(h, down, groups)
    floor = norms[norms > 0].min() if (norms > 0).any() else torch.tensor(1e-12)
    weight, bias = fit_linear(x, norms.clamp_min(floor).log(), config.router_ridge)
    scores = x @ weight.t() + bias
    chosen = scores.topk(config.top_k, dim=1).indices
    offsets = skipped_means(h, down, groups, chosen) if config.compensate else None

    y = h @ down.t()
    y_moe = _factorized_output(h, down, shared, groups, chosen, offsets)
    y_oracle = _factorized_output(h, down, shared, groups, norms.topk(config.top_k, dim=1).indices, None)
    energy = y.square().sum().clamp_min(1e-30)
    stats = {
        "router_hit_rate": top_k_hits(scores, norms, config.top_k),
        "rel_error": ((y - y_moe).square().sum() / energy).item(),
        "rel_error_oracle": ((y - y_oracle).square().sum() / energy).item(),
        "tokens": x.shape[0],
    }
    return Factorization(shared, groups, weight, bias, offsets, stats)


def _factorized_output(h, down, shared, groups, chosen, offsets) -> torch.Tensor:
    """The factorised FFN's output computed from the dense activations (masking the neurons a token skips)."""
    keep = torch.zeros_like(h, dtype=torch.bool)
    keep[:, shared] = True
    runs = chosen_mask(chosen, len(groups))
    for e, g in enumerate(groups):
        keep[:, g] |= runs[:, e:e + 1]
    out = (h * keep) @ down.t()
    if offsets is not None:
        out = out + (~runs).float() @ offsets
    return out


def build_moe(ffn: nn.Module, fact: Factorization, top_k: int) -> MoeFFN:
    """A ``MoeFFN`` holding slices of the dense FFN's weights (exact copies: pruned zeros stay zero)."""
    gate, up, down = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    hidden = gate.shape[1]
    compensate = fact.offsets is not None
    moe = MoeFFN(hidden, len(fact.shared), [len(g) for g in fact.groups], top_k, ffn.act_fn, compensate)
    moe.to(device=gate.device, dtype=gate.dtype)
    with torch.no_grad():
        parts = ([(moe.shared, fact.shared)] if moe.shared is not None else []) + list(zip(moe.experts, fact.groups))
        for expert, idx in parts:
            idx = idx.to(gate.device)
            expert.gate_proj.weight.copy_(gate[idx])
            expert.up_proj.weight.copy_(up[idx])
            expert.down_proj.weight.copy_(down[:, idx])
        moe.router.weight.copy_(fact.router_weight)
        moe.router.bias.copy_(fact.router_bias)
        if compensate:
            for expert, c in zip(moe.experts, fact.offsets):
                expert.down_proj.bias.copy_(-c)
            moe.offset.copy_(fact.offsets.sum(0))
    return moe


@torch.no_grad()
def routing_hit_rate(model: nn.Module, token_batches) -> list[float]:
    """Per MoE FFN, the share of the oracle's top-k experts (largest ‖W_down h‖) that its router picks, on the
    tokens of ``token_batches`` (held-out text: the report's own figure is measured on the calibration tokens)."""
    modules = [m for m in model.modules() if isinstance(m, MoeFFN)]
    hits = [0.0] * len(modules)
    tokens = [0] * len(modules)

    def hook_for(i, moe):
        def hook(module, args):
            x = args[0].reshape(-1, moe.hidden_size)
            oracle = torch.stack([nn.functional.linear(e.act_fn(e.gate_proj(x)) * e.up_proj(x), e.down_proj.weight)
                                  .float().norm(dim=1) for e in moe.experts], dim=1)
            hits[i] += top_k_hits(moe.router(x), oracle, moe.top_k) * x.shape[0]
            tokens[i] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(i, m)) for i, m in enumerate(modules)]
    try:
        device = next(model.parameters()).device
        for ids in token_batches:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [h / max(t, 1) for h, t in zip(hits, tokens)]
