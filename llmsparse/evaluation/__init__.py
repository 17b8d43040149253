"""Judging models as users do: perplexity, lm-eval tasks (offline copies when the hub is unreachable), and the
dense-against-sparse report in Markdown, JSON and plots."""
