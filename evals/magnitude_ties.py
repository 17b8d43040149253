"""Why magnitude 2:4 differs from the reference on the CPU protocol: ties among equal magnitudes.

SmolLM2's Q4_1 GGUF weights take at most 16 distinct values per block of 32, so many groups of 4 hold two equal
magnitudes at the cut, and which of them survives is up to the implementation. This script counts those groups,
then prunes the reference's way (locuslab/wanda's ``prune_magnitude``: per group, prune the ``torch.topk(...,
largest=False)`` of |W|) and measures perplexity on the CPU protocol's 80 × 512 WikiText-2 windows.

    python evals/magnitude_ties.py      # ~2 minutes on 2 cores; writes evals/results/magnitude_ties.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMSPARSE_ASSETS", REPO.parent / "shared" / "assets"))
GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_TEXT = ASSETS / "text" / "wikitext2_raw_test_joined.txt"
RESULTS = REPO / "evals" / "results" / "magnitude_ties.json"


def reference_keep(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """The reference's N:M magnitude mask: in each group of ``m`` columns prune the ``m - n`` smallest by topk."""
    magnitude = weight.abs()
    prune = torch.zeros_like(weight, dtype=torch.bool)
    for start in range(0, weight.shape[1], m):
        prune.scatter_(1, start + torch.topk(magnitude[:, start:start + m], m - n, dim=1, largest=False)[1], True)
    return ~prune


def main() -> int:
    import llmsparse
    from llmsparse.core.progress import quiet_transformers
    from llmsparse.data.text import read_text, tokenize_text
    from llmsparse.evaluation.perplexity import perplexity
    from llmsparse.models.structure import find_decoder_layers
    from llmsparse.pruning.masks import nm_mask

    quiet_transformers()
    model, tokenizer = llmsparse.load(str(GGUF)), llmsparse.load_tokenizer(str(GGUF))
    linears = [m for layer in find_decoder_layers(model)[1] for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    groups = tied = differ = 0
    reference = []
    for linear in linears:
        w = linear.weight.detach()
        ordered = w.abs().reshape(w.shape[0], -1, 4).sort(dim=2).values
        groups += ordered.shape[0] * ordered.shape[1]
        tied += int((ordered[..., 1] == ordered[..., 2]).sum())
        keep = reference_keep(w)
        differ += int((keep != nm_mask(w.abs(), 2, 4)).reshape(-1, 4).any(1).sum())
        reference.append(keep)
    for linear, keep in zip(linears, reference):
        linear.weight.data *= keep
    started = time.perf_counter()
    ids = tokenize_text(tokenizer, read_text(EVAL_TEXT))
    ppl = perplexity(model, ids, seqlen=512, max_windows=80).ppl
    result = {"groups": groups, "tied_at_cut": tied, "groups_where_masks_differ": differ,
              "ppl_reference_tie_break": ppl, "eval_s": round(time.perf_counter() - started, 1),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
