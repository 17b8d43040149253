"""The ``llmsparse`` command line: builds each command's flags from its settings classes, calls the workflow, prints.

Nothing here computes anything; the parser is built without torch (settings classes are torch-free and the
workflows are imported by the command that runs), so ``--help`` and argument errors are immediate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .core.errors import LlmsparseError
from .core.options import build, default_of, flag_of, is_required, options_of
from .core.version import __version__
from .data.demo import DEMO_NAME, DEMO_TEXT
from .evaluation.settings import PerplexitySettings
from .models.placement import Placement
from .workflows.steps import STEPS

# The bundled demo runs in seconds: small calibration on the bundled text, when the user gave no model.
DEMO_SETTINGS = {"calib": str(DEMO_TEXT), "nsamples": 32, "seqlen": 128}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``llmsparse: error: ...`` with exit code 2, like every bad input."""

    def error(self, message):
        sub = self.prog.removeprefix("llmsparse").strip()
        self.exit(2, f"llmsparse: error: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)\n")


def _type_of(field: dataclasses.Field):
    kinds = [k.strip() for k in str(field.type).split("|") if k.strip() != "None"]
    return {"int": int, "float": float}.get(kinds[0], str) if len(kinds) == 1 else str


def add_options(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per command-line field of a settings class; flags not given are left out of the namespace, so the
    class's own defaults apply."""
    for field in options_of(cls):
        if not field.metadata.get("cli", True) or field.name in skip:
            continue
        meta = field.metadata
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": meta.get("help", "").replace("%", "%%")}
        if str(field.type) == "bool":
            kwargs["action"] = "store_false" if default_of(field) else "store_true"
        elif str(field.type) == "list[str]":
            kwargs.update(action="append", metavar=meta.get("metavar"))
        else:  # values (choices included) are checked by the settings class, in one place with its own message
            kwargs.update(type=_type_of(field), metavar=meta.get("metavar"), required=is_required(field))
        parser.add_argument(flag_of(field), **kwargs)


def settings(args: argparse.Namespace, cls, defaults: dict | None = None):
    """An instance of ``cls`` from the flags given (over ``defaults``, e.g. the demo's)."""
    names = {f.name for f in options_of(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return build(cls, {**{k: v for k, v in (defaults or {}).items() if k in names}, **given})


def _model_arg(p: argparse.ArgumentParser, optional: bool) -> None:
    p.add_argument("model", nargs="?" if optional else None, default=None,
                   help="hub id, local folder (dense, compact or moefied) or .gguf file"
                        + (f" (default: the bundled {DEMO_NAME} demo model)" if optional else ""))


def _output_args(p: argparse.ArgumentParser, out_help: str, required: bool = True) -> None:
    p.add_argument("--out", required=required, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress or summary")


def _step_parser(sub, name: str, description: str, optional_model: bool, out_help: str, out_required: bool):
    """A subcommand for a model step: the model, every option of the step, and the output flags."""
    step = STEPS[name]
    p = sub.add_parser(name, help=step.help, description=description)
    _model_arg(p, optional_model)
    for cls in step.groups:
        add_options(p, cls)
    _output_args(p, out_help, out_required)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmsparse", description="Post-training sparsification of Hugging Face LLMs.")
    parser.add_argument("--version", action="version", version=f"llmsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _step_parser(sub, "prune", "Prune every Linear inside the decoder layers (embeddings and lm_head untouched).",
                 True, "output folder (default: <model name>-<method>-<pattern>)", False).set_defaults(func=cmd_prune)
    _step_parser(sub, "export", "Load a model (folder, GGUF file or hub id) and write it in another format.",
                 False, "output folder", True).set_defaults(func=cmd_export)
    _step_parser(sub, "finetune", "Fine-tune a pruned model on local text; pruned weights stay exactly zero. "
                                  "Writes the same folder layout as prune, with a 'finetune' section in "
                                  "llmsparse.json.", False, "output folder", True).set_defaults(func=cmd_finetune)
    _step_parser(sub, "moefy", "Factorise each SwiGLU/GeGLU FFN into experts and a closed-form router from "
                               "calibration activations; the output folder loads with llmsparse.load or "
                               "transformers (trust_remote_code=True).", True,
                 "output folder (default: <model name>-moe<E>s<S>k<K>)", False).set_defaults(func=cmd_moefy)

    p = sub.add_parser("inspect", help="per-module format, sparsity and bytes of a model",
                       description="Sizes of a model against dense and the formats' ideal: a compact folder from its "
                                   "headers alone, any other source loaded.")
    _model_arg(p, False)
    add_options(p, Placement)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verify", action="store_true",
                   help="also read every byte of a folder llmsparse wrote and check it against the checksums in its "
                        "llmsparse.json, and say what was verified")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("ppl", help="perplexity over non-overlapping windows of a text file")
    _model_arg(p, False)
    add_options(p, PerplexitySettings)
    add_options(p, Placement)
    p.add_argument("--json", action="store_true", help="print one JSON object (ppl, nll, tokens, windows, seqlen)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ppl)

    step = STEPS["eval"]
    p = sub.add_parser("eval", help=step.help,
                       description="Evaluate models (hub ids, folders or .gguf files) and write report.md, "
                                   "results.json and plots. The first model is the baseline for the deltas. Offline "
                                   "(or with HF_HUB_OFFLINE=1), standard task names use local copies.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="hub id, model folder or .gguf file (first: dense)")
    for cls in step.groups:
        add_options(p, cls, skip=("compare_dense",))
    p.add_argument("--labels", default=None, help="comma-separated names of the models in the report")
    _output_args(p, "report folder")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="run a recipe (YAML steps: prune, export, finetune, moefy, eval) on a model",
                       description="Validate the recipe, then run its steps in order; each step writes OUT/<i>-<step> "
                                   "and a rerun resumes after the last finished step.")
    p.add_argument("recipe", help="recipe file, e.g. recipes/wanda-2of4.yaml")
    p.add_argument("--model", required=True, help="hub id, model folder or .gguf file")
    p.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE",
                   help="override a setting of every step of that kind, e.g. --set prune.nsamples=32 (repeatable)")
    p.add_argument("--device", default=None, help="execution device of every step (default: cuda if present)")
    p.add_argument("--check", action="store_true", help="only validate the recipe and print its steps")
    _output_args(p, "run folder (one subfolder per step)")
    p.set_defaults(func=cmd_run)
    return parser


def _name(model: str | None) -> str:
    return DEMO_NAME if model is None else (Path(model.rstrip("/")).name.removesuffix(".gguf") or "model")


def _demo_settings(args, cls):
    """``cls`` from the flags given, over the demo's calibration defaults when no model is given (said once the
    settings are known to be valid)."""
    config = settings(args, cls, DEMO_SETTINGS if args.model is None else None)
    if args.model is None and not args.quiet:
        print(f"no model given: using the bundled {DEMO_NAME} demo model on its bundled TinyStories sample",
              file=sys.stderr)
    return config


def cmd_prune(args) -> int:
    from .pruning.config import PruneConfig
    from .workflows.options import PruneRun, SaveOptions
    from .workflows.prune import run_prune

    config = _demo_settings(args, PruneConfig)
    recipe = "-".join([config.method] + (["owl"] if config.allocation == "owl" else [])
                      + ([config.refine.replace(",", "-")] if config.refine else []))
    pattern = str(config.parsed_pattern()).replace(":", "of")
    out = args.out or (f"{DEMO_NAME}-pruned" if args.model is None else f"{_name(args.model)}-{recipe}-{pattern}")
    run_prune(args.model, out, config, settings(args, Placement), settings(args, PruneRun),
              settings(args, SaveOptions), overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_export(args) -> int:
    from .workflows.export import run_export
    from .workflows.options import ExportOptions

    run_export(args.model, args.out, settings(args, ExportOptions), settings(args, Placement), overwrite=args.overwrite,
               progress=not args.quiet)
    return 0


def cmd_finetune(args) -> int:
    from .training.config import FinetuneConfig
    from .workflows.finetune import run_finetune
    from .workflows.options import SaveOptions

    run_finetune(args.model, args.out, settings(args, FinetuneConfig), settings(args, Placement),
                 settings(args, SaveOptions), overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_moefy(args) -> int:
    from .moe.config import MoefyConfig
    from .workflows.moefy import run_moefy
    from .workflows.options import SaveOptions

    config = _demo_settings(args, MoefyConfig)
    out = args.out or f"{_name(args.model)}-moe{config.experts}s{config.shared}k{config.top_k}"
    run_moefy(args.model, out, config, settings(args, Placement), settings(args, SaveOptions),
              overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_inspect(args) -> int:
    from .workflows.inspect import inspect_folder

    report = inspect_folder(args.model, settings(args, Placement), verify=args.verify)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0


def cmd_ppl(args) -> int:
    from .workflows.inspect import run_perplexity

    result = run_perplexity(args.model, settings(args, PerplexitySettings), settings(args, Placement))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.windows} windows of {result.seqlen} tokens "
              f"({result.tokens} predicted tokens)")
    return 0


def cmd_eval(args) -> int:
    from .evaluation.settings import EvalSettings
    from .workflows.evaluate import evaluate

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    evaluate(args.models, settings(args, EvalSettings), args.out, settings(args, Placement),
                 overwrite=args.overwrite, progress=not args.quiet, labels=labels)
    return 0


def cmd_run(args) -> int:
    from .workflows.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.check:
        print(f"{args.recipe}: valid recipe {recipe.name!r}")
        for i, step in enumerate(recipe.steps, 1):
            print(f"  {i}. {step.kind}: {json.dumps(step.settings)}")
        return 0
    from .workflows.run_recipe import run_recipe

    run_recipe(recipe, args.model, args.out, device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "quiet", False):
            from .core.progress import quiet_transformers

            quiet_transformers()
        return args.func(args)
    except LlmsparseError as e:
        print(f"llmsparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmsparse: interrupted; no output folder was written (a prune continues with --resume)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `llmsparse inspect DIR | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
