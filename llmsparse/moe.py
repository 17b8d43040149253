"""``moefy``: split every dense gated FFN (SwiGLU / GeGLU) of a trained LLM into experts and a router, training-free.

Per decoder layer, from the FFN inputs of the calibration windows (collected by the layer walk, with the previous
layers already factorised):

1. neuron contribution ``a_j(t) = |h_j(t)| · ‖W_down[:, j]‖`` for every calibration token t, with
   ``h = act(W_gate x) ⊙ (W_up x)``;
2. shared expert: the neurons with the largest mean contribution (always active);
3. routed experts: balanced k-means of the remaining neurons on their (unit-normalised) contribution profiles over
   the calibration tokens, so neurons that fire on the same tokens share an expert; every expert gets the same
   number of neurons (±1 when the FFN width is not a multiple of the expert count);
4. router: a linear map fitted in closed form (ridge least squares) to predict each expert's log output norm
   ``log ‖expert_e(x)‖`` from x; a token runs the ``top_k`` experts with the largest predicted norm;
5. compensation (optional): an expert a token skips contributes its calibration mean when skipped instead of nothing.
   It is folded into the weights (expert output bias ``-c_e``, FFN offset ``Σ c_e``), so with every expert active the
   FFN is still exactly the dense one.
6. fine-tuning (optional, ``finetune_steps``): a few Trainer updates of the experts and routers
   (``llmsparse.moe_finetune``), by default on fresh windows of the calibration source that each step sees once:
   repeating the few calibration windows overfits them (docs/moefy.md).

The module itself is ``llmsparse.moe_modeling.MoeFFN``; ``llmsparse.moe_export`` saves a model transformers loads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import from_known_fields
from .data import calibration_windows, load_documents, run_calibration
from .engine import LayerRun, walk_layers
from .errors import LlmsparseError
from .models import find_decoder_layers
from .moe_modeling import MoeFFN
from .progress import LayerProgress, say


FINETUNE_DATA = ("fresh", "calibration")


@dataclass
class MoefyConfig:
    """Everything that decides what a moefy run does (recorded verbatim in its report)."""

    experts: int = 16
    shared: int = 4
    top_k: int = 8
    calib: str = "c4"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    calib_batch_size: int = 8
    compensate: bool = True
    router_ridge: float = 1e-3
    kmeans_iters: int = 25
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 4
    finetune_data: str = "fresh"

    def __post_init__(self):
        for name in ("experts", "nsamples", "seqlen", "calib_batch_size", "kmeans_iters", "finetune_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LlmsparseError(f"{name} must be a positive integer, got {value!r}")
        steps = self.finetune_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise LlmsparseError(f"--finetune-steps must be a non-negative integer (0: no fine-tuning), got {steps!r}")
        if self.finetune_data not in FINETUNE_DATA:
            raise LlmsparseError(f"--finetune-data must be one of {', '.join(FINETUNE_DATA)}, got {self.finetune_data!r}")
        if not self.finetune_lr > 0:
            raise LlmsparseError(f"--finetune-lr must be positive, got {self.finetune_lr!r}")
        if self.experts < 2:
            raise LlmsparseError(f"--experts must be at least 2, got {self.experts}")
        if not isinstance(self.shared, int) or not 0 <= self.shared < self.experts:
            raise LlmsparseError(f"--shared must be in [0, --experts), got {self.shared} with --experts {self.experts}")
        routed = self.experts - self.shared
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= routed:
            raise LlmsparseError(f"--top-k must be in [1, {routed}] (the routed experts, --experts minus --shared), "
                                 f"got {self.top_k}")
        if self.seqlen < 2:
            raise LlmsparseError(f"seqlen must be at least 2, got {self.seqlen}")
        if not self.router_ridge > 0:
            raise LlmsparseError(f"router_ridge must be positive, got {self.router_ridge!r}")

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "MoefyConfig":
        return from_known_fields(cls, kwargs, "moefy")


# ---------------------------------------------------------------------------------------------------------------
# Pure tensor functions (each tested alone)


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


# ---------------------------------------------------------------------------------------------------------------
# Cost accounting and the report


def ffn_cost(hidden: int, width: int, moe: MoeFFN | None = None) -> dict:
    """Parameters a token touches in one FFN and the FLOPs it spends there (2 per multiply-add), dense or MoE."""
    if moe is None:
        return {"params": 3 * hidden * width, "flops": 6 * hidden * width}
    chosen = sorted((e.gate_proj.out_features for e in moe.experts), reverse=True)[:moe.top_k]
    neurons = (moe.shared.gate_proj.out_features if moe.shared is not None else 0) + sum(chosen)
    routed = len(moe.experts)
    router = routed * (hidden + 1)
    biases = (hidden * (1 + min(moe.top_k, routed))) if moe.offset is not None else 0
    return {"params": 3 * hidden * neurons + router + biases,
            "flops": 6 * hidden * neurons + 2 * router + biases + hidden * min(moe.top_k, routed)}


@dataclass
class MoefyReport:
    """What a moefy run did: per-layer split and router quality, active parameters and FLOPs against dense."""

    config: MoefyConfig
    device: str
    layers: list = field(default_factory=list)
    times: dict = field(default_factory=dict)
    dense: dict = field(default_factory=lambda: {"params": 0, "flops": 0})
    active: dict = field(default_factory=lambda: {"params": 0, "flops": 0})
    finetune: dict | None = None

    @property
    def active_fraction(self) -> float:
        return self.active["params"] / max(self.dense["params"], 1)

    @property
    def flops_fraction(self) -> float:
        return self.active["flops"] / max(self.dense["flops"], 1)

    @property
    def router_hit_rate(self) -> float:
        return sum(l["router_hit_rate"] for l in self.layers) / max(len(self.layers), 1)

    def to_json(self) -> dict:
        import transformers

        from . import __version__

        return {
            "llmsparse_version": __version__,
            "settings": self.config.to_json(),
            "seed": self.config.seed,
            "device": self.device,
            "totals": {
                "ffn_params_dense_per_token": self.dense["params"],
                "ffn_params_active_per_token": self.active["params"],
                "ffn_active_fraction": self.active_fraction,
                "ffn_flops_dense_per_token": self.dense["flops"],
                "ffn_flops_active_per_token": self.active["flops"],
                "ffn_flops_fraction": self.flops_fraction,
                "router_hit_rate": self.router_hit_rate,
                "router_hit_rate_note": "share of the oracle's top-k experts (largest output norms) the router "
                                        "picks, on the calibration tokens",
            },
            "layers": self.layers,
            "finetune": self.finetune,
            "times": self.times,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }

    def summary(self) -> str:
        c = self.config
        lines = [f"{'layer':>5}  {'hit rate':>8}  {'rel err':>8}  {'oracle':>8}  {'seconds':>7}"]
        for l in self.layers:
            lines.append(f"{l['index']:>5}  {l['router_hit_rate']:>8.3f}  {l['rel_error']:>8.4f}  "
                         f"{l['rel_error_oracle']:>8.4f}  {l['seconds']:>7.1f}")
        lines.append(
            f"moefied {len(self.layers)} FFNs into {c.shared} shared + {c.routed} routed experts, top-{c.top_k}: "
            f"{self.active_fraction:.1%} of FFN parameters and {self.flops_fraction:.1%} of FFN FLOPs per token; "
            f"router hit rate {self.router_hit_rate:.3f} (calibration tokens) in "
            f"{self.times.get('moefy_s', 0):.1f} s, seed {c.seed}")
        if self.finetune is not None:
            f = self.finetune
            lines.append(f"fine-tuned experts and routers {f['steps']} steps on {f['windows']} {f['data']} windows "
                         f"({f['seconds']:.0f} s): training loss "
                         f"{f['loss_first']:.4f} → {f['loss_last']:.4f}; router hit rate {f['router_hit_rate']:.3f} "
                         f"on the calibration windows afterwards")
        return "\n".join(lines)


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


# ---------------------------------------------------------------------------------------------------------------
# The whole model


def finetune_windows(tokenizer, config: MoefyConfig, calibration: torch.Tensor) -> torch.Tensor:
    """The token windows moefy's fine-tuning trains on: ``finetune_steps × finetune_batch_size`` fresh windows of
    ``config.calib`` drawn with seed + 1 (a different draw from the calibration one), or the calibration windows
    themselves with ``finetune_data="calibration"``."""
    if config.finetune_data == "calibration":
        return calibration
    if tokenizer is None:
        raise LlmsparseError("fine-tuning on fresh windows needs a tokenizer: pass one, or finetune_data='calibration' "
                             "to train on the calibration windows")
    return calibration_windows(tokenizer, load_documents(config.calib),
                               config.finetune_steps * config.finetune_batch_size, calibration.shape[1], config.seed + 1)


def moefy(model: nn.Module, tokenizer=None, config: MoefyConfig | None = None, *,
          calibration: torch.Tensor | None = None, device=None, cache_device=None, progress: bool = True,
          **settings) -> MoefyReport:
    """Replace every decoder layer's gated FFN of ``model`` in place by a ``MoeFFN``; return the report.

    Settings are a ``MoefyConfig`` or its fields as keywords (``experts``, ``shared``, ``top_k``, ``calib``,
    ``nsamples``, ``seqlen``, ``seed``, ...). ``calibration`` may give the token windows directly as a LongTensor
    [nsamples, seqlen]; otherwise they are drawn from ``config.calib`` with ``tokenizer``.
    """
    from .devices import execution_device

    if config is None:
        config = MoefyConfig.from_kwargs(**settings)
    elif settings:
        raise LlmsparseError("give either a MoefyConfig or keyword settings, not both")
    device = execution_device(device)
    if any(isinstance(m, MoeFFN) for m in model.modules()):
        raise LlmsparseError("this model is already moefied: moefy a dense model")
    _, layers = find_decoder_layers(model)
    for layer in layers:
        check_ffn(find_ffn(layer)[1], config.experts)

    started = time.perf_counter()
    calibration = run_calibration(model, tokenizer, config, calibration, "moefy")
    tuning = finetune_windows(tokenizer, config, calibration) if config.finetune_steps else None
    report = MoefyReport(config=config, device=device)
    report.times["calibration_data_s"] = round(time.perf_counter() - started, 3)
    bar = LayerProgress(f"moefy E{config.experts} S{config.shared} k{config.top_k}", enabled=progress)

    def visit(run: LayerRun) -> None:
        t0 = time.perf_counter()
        name, ffn = find_ffn(run.layer)
        inputs = []
        handle = ffn.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().flatten(0, -2)))
        try:
            for i in range(len(run.inputs)):
                run.forward(i)
        finally:
            handle.remove()
        fact = factorize(ffn, torch.cat(inputs), config)
        moe = build_moe(ffn, fact, config.top_k)
        setattr(run.layer, name, moe)
        run.modified = True
        hidden, width = ffn.gate_proj.in_features, ffn.gate_proj.out_features
        dense, active = ffn_cost(hidden, width), ffn_cost(hidden, width, moe)
        for key in ("params", "flops"):
            report.dense[key] += dense[key]
            report.active[key] += active[key]
        report.layers.append({"index": run.index, "name": f"{run.name}.{name}", "width": width,
                              "shared_neurons": len(fact.shared), "expert_neurons": [len(g) for g in fact.groups],
                              **fact.stats, "active_params": active["params"], "dense_params": dense["params"],
                              "seconds": round(time.perf_counter() - t0, 3)})

    try:
        walk_layers(model, calibration.split(config.calib_batch_size), visit, device=device,
                    cache_device=cache_device, on_layer=bar.on_layer, on_batch=bar.on_batch)
    except torch.cuda.OutOfMemoryError as e:
        raise LlmsparseError(f"out of memory on {device} during moefy: lower --nsamples/--seqlen or use --device cpu") from e
    finally:
        bar.close()
    report.times["moefy_s"] = round(time.perf_counter() - started, 3)
    if config.finetune_steps:
        from .moe_finetune import finetune_moe

        t0 = time.perf_counter()
        report.finetune = finetune_moe(model, tuning, steps=config.finetune_steps, lr=config.finetune_lr,
                                       batch_size=config.finetune_batch_size, seed=config.seed, device=device,
                                       progress=progress, hit_rate_windows=calibration)
        report.finetune.update(data=config.finetune_data, windows=len(tuning))
        report.times["finetune_s"] = round(time.perf_counter() - t0, 3)
    say(report.summary(), progress)
    return report
