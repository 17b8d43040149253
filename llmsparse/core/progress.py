"""Progress display for long jobs: one bar over decoder layers with the current stage and batch."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class LayerProgress:
    """Callbacks for ``walk_layers``; silent when ``enabled`` is False (``--quiet``)."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self.enabled = enabled
        self.bar = None

    def on_layer(self, index: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="layer", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.5)
        else:
            self.bar.update(1)
        self.bar.set_postfix_str(f"layer {index + 1}/{total}", refresh=False)

    def on_batch(self, stage: str, done: int, total: int) -> None:
        if self.bar is not None and (done == total or done % 8 == 0):
            self.bar.set_postfix_str(f"layer {self.bar.n + 1}/{self.bar.total} {stage} {done}/{total}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None


def quiet_transformers() -> None:
    """Silence transformers' own loading/saving bars and warnings (for --quiet)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def say(message: str, enabled: bool = True) -> None:
    """A status line on stderr (stdout stays clean for --json output)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)
