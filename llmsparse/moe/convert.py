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

The module itself is ``modeling.MoeFFN``; ``export`` makes the saved folder one that transformers loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration.engine import LayerRun, walk_layers
from ..calibration.windows import windows_for
from ..core.devices import execution_device
from ..core.errors import LlmsparseError
from ..core.progress import LayerProgress, say
from ..core.records import RunReport
from ..data.calibration import calibration_windows, load_documents
from ..models.structure import find_decoder_layers
from .config import MoefyConfig
from .export import moe_spec
from .factorize import build_moe, check_ffn, factorize, find_ffn
from .finetune import finetune_moe
from .modeling import MoeFFN

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
class MoefyReport(RunReport):
    """What a moefy run did: per-layer split and router quality, active parameters and FLOPs against dense."""

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
        return sum(row["router_hit_rate"] for row in self.layers) / max(len(self.layers), 1)

    def to_json(self) -> dict:
        return {
            **self.header(),
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
        }

    def summary(self) -> str:
        c = self.config
        lines = [f"{'layer':>5}  {'hit rate':>8}  {'rel err':>8}  {'oracle':>8}  {'seconds':>7}"]
        for row in self.layers:
            lines.append(f"{row['index']:>5}  {row['router_hit_rate']:>8.3f}  {row['rel_error']:>8.4f}  "
                         f"{row['rel_error_oracle']:>8.4f}  {row['seconds']:>7.1f}")
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
    count = config.finetune_steps * config.finetune_batch_size
    return calibration_windows(tokenizer, load_documents(config.calib), count, calibration.shape[1], config.seed + 1)


def moefy(model: nn.Module, tokenizer=None, config: MoefyConfig | None = None, *,
          calibration: torch.Tensor | None = None, device=None, cache_device=None, progress: bool = True,
          **settings) -> MoefyReport:
    """Replace every decoder layer's gated FFN of ``model`` in place by a ``MoeFFN``; return the report.

    Settings are a ``MoefyConfig`` or its fields as keywords (``experts``, ``shared``, ``top_k``, ``calib``,
    ``nsamples``, ``seqlen``, ``seed``, ...). ``calibration`` may give the token windows directly as a LongTensor
    [nsamples, seqlen]; otherwise they are drawn from ``config.calib`` with ``tokenizer``.
    """
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
    calibration = windows_for(model, tokenizer, config, calibration, "moefy")
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
        raise LlmsparseError(f"out of memory on {device} during moefy: lower --nsamples/--seqlen or use --device "
                             "cpu") from e
    finally:
        bar.close()
    report.times["moefy_s"] = round(time.perf_counter() - started, 3)
    if config.finetune_steps:
        t0 = time.perf_counter()
        report.finetune = finetune_moe(model, tuning, steps=config.finetune_steps, lr=config.finetune_lr,
                                       batch_size=config.finetune_batch_size, seed=config.seed, device=device,
                                       progress=progress, hit_rate_windows=calibration)
        report.finetune.update(data=config.finetune_data, windows=len(tuning))
        report.times["finetune_s"] = round(time.perf_counter() - t0, 3)
    moe_spec(model)  # the model can be saved and loaded back
    say(report.summary(), progress)
    return report
