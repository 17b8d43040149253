"""Turn local benchmark rows back into the fields of lm-eval's standard datasets.

Each function is a ``process_docs`` hook: it receives the rows read from the local file and returns rows with the
field names and texts that the standard task's templates expect, so the prompts lm-eval builds are the standard
ones. The inverse transformations are exact for the llm-foundry files (they were made from the same datasets);
HellaSwag's re-capitalisation is reconstructed (see README.md).
"""

from __future__ import annotations

import datasets

ARC_QUERY = "Question: "
BOOLQ_PASSAGE, BOOLQ_QUESTION = "Passage: ", "\nQuestion: "
HELLASWAG_LINES = 6  # "activity_label: context", gold index, then the four endings
SENTENCE_ENDS = (". ", "! ", "? ")


def arc(dataset: datasets.Dataset) -> datasets.Dataset:
    """llm-foundry ``{"query": "Question: q", "choices", "gold"}`` → ai2_arc's question / choices / answerKey."""

    def convert(row):
        labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
        return {
            "question": _strip_prefix(row["query"], ARC_QUERY, "ARC"),
            "choices": {"text": row["choices"], "label": labels},
            "answerKey": labels[row["gold"]],
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def boolq(dataset: datasets.Dataset) -> datasets.Dataset:
    """llm-foundry ``"Passage: p\\nQuestion: q?"`` with gold 0/1 → SuperGLUE BoolQ's passage / question / label."""

    def convert(row):
        passage, sep, question = _strip_prefix(row["query"], BOOLQ_PASSAGE, "BoolQ").rpartition(BOOLQ_QUESTION)
        if not sep or not question.endswith("?"):
            raise ValueError(f"BoolQ row is not 'Passage: ...\\nQuestion: ...?': {row['query'][:80]!r}")
        return {"passage": passage, "question": question[:-1], "label": row["gold"]}

    return dataset.map(convert, remove_columns=dataset.column_names)


def lambada(dataset: datasets.Dataset) -> datasets.Dataset:
    """llm-foundry ``{"context", "continuation"}`` (the last space-separated word) → lambada_openai's ``text``."""
    return dataset.map(lambda row: {"text": row["context"] + " " + row["continuation"]},
                       remove_columns=dataset.column_names)


def hellaswag(dataset: datasets.Dataset) -> datasets.Dataset:
    """The 6-lines-per-task text (one document) → lm-eval's processed hellaswag rows: query, choices, gold, label.

    lm-eval calls ``process_docs`` each time it asks for the split, so the result is kept per input dataset.
    """
    key = getattr(dataset, "_fingerprint", None)
    if key is None or key not in _HELLASWAG_CACHE:
        _HELLASWAG_CACHE.clear()
        _HELLASWAG_CACHE[key] = _hellaswag_rows(dataset)
    return _HELLASWAG_CACHE[key]


_HELLASWAG_CACHE: dict = {}


def _hellaswag_rows(dataset: datasets.Dataset) -> datasets.Dataset:
    rows = []
    for document in dataset["text"]:
        lines = document.split("\n")
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) % HELLASWAG_LINES:
            raise ValueError(f"HellaSwag text has {len(lines)} lines, not a multiple of {HELLASWAG_LINES}")
        for start in range(0, len(lines), HELLASWAG_LINES):
            context, label, *endings = lines[start:start + HELLASWAG_LINES]
            rows.append({"query": recapitalise(context), "choices": endings, "gold": int(label), "label": label})
    return datasets.Dataset.from_list(rows)


def recapitalise(context: str) -> str:
    """Capitalise the trailing sentence fragment as lm-eval does to ``ctx_b`` (``str.capitalize``).

    The text file keeps ``activity_label: ctx_a ctx_b`` without lm-eval's capitalisation of ``ctx_b``, the
    incomplete noun phrase that ends ActivityNet contexts (empty for WikiHow ones). That fragment is taken to be
    the text after the last sentence end (or after the label) when it starts in lower case and does not itself
    end a sentence; complete sentences are left alone.
    """
    label, sep, body = context.partition(": ")
    cut = max(body.rfind(end) for end in SENTENCE_ENDS)
    head, fragment = (body[:cut + 2], body[cut + 2:]) if cut >= 0 else ("", body)
    if not fragment[:1].islower() or fragment.rstrip().endswith((".", "!", "?")):
        return context
    return label + sep + head + fragment.capitalize()


def _strip_prefix(text: str, prefix: str, task: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"{task} row does not start with {prefix!r}: {text[:80]!r}")
    return text[len(prefix):]
