"""Forward hooks that feed each targeted module's ``InputStats`` while calibration batches run through a layer."""

from __future__ import annotations

import torch

from ..models.experts import ExpertWeight
from .expert_stats import ExpertStats
from .stats import InputStats


class StatsCollector:
    """Installs forward hooks that feed ``InputStats`` for a set of targets, sharing work between modules that
    read the very same input tensor (q/k/v, gate/up): the statistics are computed once and aliased.

    Targets are Linear-like modules (hooked directly) or ``ExpertWeight`` slices of fused MoE experts (one hook per
    experts module computes every expert's inputs; see ``expert_stats``). Modules in ``paired`` also get the
    ``"cross"`` statistic: before each batch, ``dense_inputs`` maps them to the dense stream's inputs of that batch.
    """

    def __init__(self, modules: dict, needs, all_expert_tokens: bool = False, paired=()):
        self.modules = {n: m for n, m in modules.items() if not isinstance(m, ExpertWeight)}
        self.needs = frozenset(needs)
        self.paired = set(paired)
        self.dense_inputs: dict[str, torch.Tensor] = {}
        self.stats: dict[str, InputStats] = {}
        self._owner: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = []
        groups: dict[int, dict] = {}
        for name, target in modules.items():
            if isinstance(target, ExpertWeight):
                groups.setdefault(id(target.experts), {})[name] = target
        self.experts = [ExpertStats(next(iter(g.values())).experts, g, self.needs, all_expert_tokens)
                        for g in groups.values()]

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        for hook in self.experts:
            self._handles.append(hook.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for hook in self.experts:
            self.stats.update({k: v for k, v in hook.stats.items() if k != "__all_tokens__"})

    def new_batch(self) -> None:
        """Call before each forward: aliasing is decided by tensor identity within one batch."""
        self._seen.clear()
        for hook in self.experts:
            hook.new_batch()

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0]
            if name not in self._owner:
                # Identity, not address: a freed tensor's address can be reused by an unrelated one.
                owner = next((seen_name for t, seen_name in self._seen if t is x), None)
                if owner is None:
                    needs = self.needs | {"cross"} if name in self.paired else self.needs
                    self.stats[name] = InputStats(x.shape[-1], x.device, needs)
                    owner = name
                else:
                    self.stats[name] = self.stats[owner]
                self._owner[name] = owner
            if not any(t is x for t, _ in self._seen):
                self._seen.append((x, name))
            if self._owner[name] == name:
                self.stats[name].add(x, self.dense_inputs.get(name))
        return hook
