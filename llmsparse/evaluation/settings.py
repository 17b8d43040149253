"""The settings of an evaluation (``llmsparse eval``, the recipe's ``eval`` step), each default written once (no
torch: the command line checks them before loading anything)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..core.checks import check_int
from ..core.errors import LlmsparseError
from ..core.options import option

DEFAULT_TASKS = ("arc_easy", "piqa", "winogrande", "hellaswag")


@dataclass
class EvalSettings:
    """What an evaluation runs; recorded in results.json and report.md."""

    tasks: list[str] | str = option(help=f"comma-separated lm-eval tasks (default {','.join(DEFAULT_TASKS)}); '' "
                                         "for none", factory=lambda: list(DEFAULT_TASKS))
    limit: int | None = option(None, "evaluate only the first N rows of each task")
    num_fewshot: int | None = option(None, "few-shot examples (default: the task's, 0)")
    batch_size: int = option(1, "lm-eval batch size (default 1)")
    data_path: str | None = option(None, "folder of local benchmark data (default $LLMSPARSE_BENCH_DIR, then "
                                         "../shared/assets/bench)")
    ppl_text: str | None = option("wikitext2", "perplexity text: wikitext2 (local copy, else the hub) or a PATH; "
                                               "none to skip (default wikitext2)")
    ppl_seqlen: int | None = option(None, "perplexity window (default min(2048, model context))")
    ppl_windows: int | None = option(None, "evaluate only the first K perplexity windows")
    bootstrap_iters: int = option(1000, "lm-eval bootstrap iterations for non-mean stderrs, e.g. LAMBADA "
                                        "perplexity (default 1000)")
    seed: int = option(0, "lm-eval's seeds (few-shot sampling; default 0)")

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not isinstance(self.tasks, (list, tuple)) or not all(isinstance(t, str) for t in self.tasks):
            raise LlmsparseError(f"tasks must be task names (a list, or comma-separated), got {self.tasks!r}")
        self.tasks = list(self.tasks)
        if isinstance(self.ppl_text, str) and self.ppl_text.strip().lower() in ("", "none"):
            self.ppl_text = None
        if not self.tasks and self.ppl_text is None:
            raise LlmsparseError("nothing to evaluate: give --tasks and/or keep the perplexity evaluation")
        for name, low in (("limit", 1), ("num_fewshot", 0), ("batch_size", 1), ("ppl_seqlen", 2), ("ppl_windows", 1),
                          ("bootstrap_iters", 0), ("seed", 0)):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, low, flag=True)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PerplexitySettings:
    """What ``llmsparse ppl`` measures."""

    text: str = option(help="text file, tokenised as one string")
    seqlen: int = option(2048, "window length in tokens (default 2048)")
    max_windows: int | None = option(None, "evaluate only the first K windows")
    batch_size: int = option(1, "windows per forward pass (default 1)")

    def __post_init__(self):
        check_int("seqlen", self.seqlen, 2, flag=True)
        check_int("batch_size", self.batch_size, flag=True)
        if self.max_windows is not None:
            check_int("max_windows", self.max_windows, flag=True)
