"""Why Wanda 70% differs from the reference on the CPU protocol: how the channel norms are summed.

llmsparse sums ‖X_j‖² over all calibration tokens in float64. The reference (locuslab/wanda's ``WrappedGPT``) keeps
a float32 running mean over samples of ``torch.norm(x_j) ** 2``. Both give the same scores up to rounding, and a
constant factor that does not change any comparison; near collapse (70%) a few weights whose scores differ by
rounding change side, and perplexity moves. This script runs a CPU-protocol row with the reference's accumulation
patched into ``InputStats`` and prints its perplexity next to the row's own.

    python evals/wanda_reference_norms.py [--row wanda_70]   # ~4 minutes on 2 cores; writes nothing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def patch_reference_accumulation() -> None:
    """Make ``InputStats`` accumulate Wanda's norms as the reference does (float32 running mean per sample)."""
    from llmsparse.calibration.stats import InputStats

    plain_add = InputStats.add

    def add(self, x: torch.Tensor) -> None:
        plain_add(self, x)
        samples = x.reshape(-1, x.shape[-2] if x.dim() > 2 else x.shape[0], self.columns)
        for sample in samples:  # the reference's batches hold one sample each
            if not hasattr(self, "ref_scaler"):
                self.ref_scaler, self.ref_samples = torch.zeros(self.columns, device=x.device), 0
            self.ref_scaler *= self.ref_samples / (self.ref_samples + 1)
            self.ref_samples += 1
            self.ref_scaler += torch.norm(sample.float().t(), p=2, dim=1) ** 2 / self.ref_samples

    InputStats.add = add
    InputStats.norms = property(lambda self: torch.sqrt(self.ref_scaler))


def main(argv=None) -> int:
    import cpu_protocol
    from gridrun import load_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", default="wanda_70")
    args = p.parse_args(argv)
    if cpu_protocol.GRID[args.row] is None or cpu_protocol.GRID[args.row]["method"] != "wanda":
        print(f"{args.row} is not a Wanda row", file=sys.stderr)
        return 2
    patch_reference_accumulation()
    result = cpu_protocol.run_row(args.row)
    ours = load_results(cpu_protocol.RESULTS).get(args.row, {}).get("ppl")
    peer = cpu_protocol.peer_figures().get(cpu_protocol.PEER_NAMES.get(args.row, args.row), {}).get("ppl")
    print(json.dumps({"row": args.row, "ppl_reference_accumulation": result["ppl"], "ppl_llmsparse": ours,
                      "ppl_reference_implementation": peer}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
