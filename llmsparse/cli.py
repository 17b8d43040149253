"""The ``llmsparse`` command line: parses arguments, calls the public API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import LlmsparseError

DEMO = {"calib_note": "bundled TinyStories sample", "nsamples": 32, "seqlen": 128, "out": "stories260K-pruned"}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``llmsparse: error: ...`` with exit code 2, like every bad input."""

    def error(self, message):
        sub = self.prog.removeprefix("llmsparse").strip()
        self.exit(2, f"llmsparse: error: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("model", nargs=None if required else "?", default=None,
                   help="hub id, local folder or .gguf file" + ("" if required else
                        " (default: the bundled stories260K demo model)"))
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the model folder or repo")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint's; float32 for GGUF), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="execution device, e.g. cuda, cuda:1, cpu (default: cuda if present)")


def build_parser() -> argparse.ArgumentParser:
    from .allocation import ALLOCATIONS
    from .checkpoint import SAVE_FORMATS
    from .evaluate import DEFAULT_TASKS
    from .methods import DEFAULT_METHOD, METHODS, REFINERS
    from .moe import FINETUNE_DATA

    parser = _Parser(prog="llmsparse", description="Post-training sparsification of Hugging Face LLMs.")
    parser.add_argument("--version", action="version", version=f"llmsparse {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model with calibration data and save it",
                       description="Prune every Linear inside the decoder layers (embeddings and lm_head untouched).")
    _add_model_args(p, required=False)
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"{' | '.join(METHODS)} (default {DEFAULT_METHOD}, the most accurate)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity in [0, 1) (default 0.5)")
    g.add_argument("--pattern", default=None, help="N:M pattern, e.g. 2:4 or 4:8 (at most N kept in every M inputs)")
    p.add_argument("--calib", default=None,
                   help="c4 | wikitext2 (from the hub) | PATH to .txt (one document) or .jsonl ('text' per line); "
                        "default c4, or the bundled sample for the demo model")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; demo 32)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; demo 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="leave modules matching this name glob dense (repeatable), e.g. '*.mlp.down_proj'")
    p.add_argument("--scope", default="row",
                   help="comparison group of unstructured masks: row (same count per output row, default) or "
                        "layer (whole matrix; SparseGPT: per column block, as in its paper)")
    p.add_argument("--expert-calibration", default="routed",
                   help="MoE experts: routed (each expert's statistics from the tokens routed to it; an expert given "
                        "fewer than 64 tokens uses all tokens) or all (every expert sees every token)")
    p.add_argument("--calib-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size (default 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening, share of mean diag(H)")
    p.add_argument("--device-map", default=None,
                   help="let accelerate place the model (auto, balanced, cpu, ...): for models larger than the GPU or "
                        "RAM; one decoder layer at a time is materialised on its device")
    p.add_argument("--max-memory", default=None, help="with --device-map: per-device limits, e.g. 0=70GiB,cpu=100GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: folder for weights offloaded to disk")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations on disk (one batch in memory at a time)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last finished layer (same settings and --out)")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="don't commit finished layers to <out>.llmsparse-work (saves disk writes; no --resume)")
    p.add_argument("--allocation", default="uniform", choices=list(ALLOCATIONS),
                   help="sparsity per decoder layer: uniform, or owl (less sparsity where activation outliers are; "
                        "unstructured only)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold: scores above M x the layer mean")
    p.add_argument("--owl-lambda", type=float, default=0.08,
                   help="OWL: layer sparsities stay within target +- lambda (default 0.08)")
    p.add_argument("--refine", default=None,
                   help=f"after the method, in order (comma-separated): {' | '.join(REFINERS)}; dsnot swaps pruned "
                        "and kept weights (training-free prune-and-grow), refit re-solves the kept weights")
    p.add_argument("--refine-max-cycles", type=int, default=50, help="DSnoT: at most this many swaps per row")
    p.add_argument("--refine-threshold", type=float, default=0.1,
                   help="DSnoT: a row stops once |its expected output error| summed over a calibration window "
                        "is at most this (the reference's units)")
    p.add_argument("--refine-var-power", type=float, default=1.0,
                   help="DSnoT: regrowth ranks W_ij*E[x_j] / Var(x_j)^power")
    p.add_argument("--refine-iters", type=int, default=10, help="refit: conjugate-gradient iterations (default 10)")
    p.add_argument("--out", default=None, help="output folder (default: <model name>-<method>-<pattern>)")
    p.add_argument("--save-format", choices=SAVE_FORMATS, default="dense",
                   help="dense: plain safetensors with zeros, for any tool (default); compact: each pruned Linear "
                        "in its smallest format (2:4, bitmap), loaded back by llmsparse.load")
    p.add_argument("--max-shard-size", default=None, help="largest weight file, e.g. 5GB (default: transformers')")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="re-save a model folder as compact or dense safetensors",
                       description="Load a model folder (compact or dense) and write it in another format.")
    p.add_argument("folder", help="local model folder (compact or dense)")
    p.add_argument("--format", dest="save_format", choices=SAVE_FORMATS, required=True,
                   help="compact (smallest format per pruned Linear) or dense (plain safetensors for other tools)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="auto", help="auto (the folder's), float32, bfloat16, float16")
    p.add_argument("--max-shard-size", default=None, help="largest weight file, e.g. 5GB (default: transformers')")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="per-module format, sparsity and bytes of a model folder",
                       description="Sizes of a compact or dense folder against dense and the formats' ideal.")
    p.add_argument("folder", help="local model folder (compact or dense)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("ppl", help="perplexity over non-overlapping windows of a text file")
    _add_model_args(p, required=True)
    p.add_argument("--text", required=True, help="text file, tokenised as one string")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object (ppl, nll, tokens, windows, seqlen)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("finetune", help="fine-tune a pruned model with the Trainer, keeping its zeros",
                       description="Fine-tune a pruned folder on local text; pruned weights stay exactly zero. "
                                   "Writes the same folder layout as prune, with a 'finetune' section in llmsparse.json.")
    _add_model_args(p, required=True)
    p.add_argument("--data", required=True, help="training text: PATH to .txt (one document) or .jsonl ('text' per line)")
    p.add_argument("--steps", type=int, required=True, help="optimizer updates")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per training block (default 512, capped to the model's)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, cosine decay; default 1e-4)")
    p.add_argument("--batch-size", type=int, default=1, help="blocks per micro-batch (default 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (default 1)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="train LoRA adapters of this rank instead of the weights, merged under the masks at the end")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="lm-eval tasks and WikiText-2 perplexity of models, with a report",
                       description="Evaluate models (hub ids, folders or .gguf files) and write report.md, "
                                   "results.json and plots. The first model is the baseline for the deltas. Offline "
                                   "(or with HF_HUB_OFFLINE=1), standard task names use local copies.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="hub id, model folder or .gguf file (first: dense)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated lm-eval tasks (default {','.join(DEFAULT_TASKS)}); '' for none")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, 0)")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    p.add_argument("--data-path", default=None,
                   help="folder of local benchmark data (default $LLMSPARSE_BENCH_DIR, then ../shared/assets/bench)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ppl-text", default="wikitext2",
                   help="perplexity text: wikitext2 (local copy, else the hub) or a PATH (default wikitext2)")
    g.add_argument("--no-ppl", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--ppl-seqlen", type=int, default=None, help="perplexity window (default min(2048, model context))")
    p.add_argument("--ppl-windows", type=int, default=None, help="evaluate only the first K perplexity windows")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="lm-eval bootstrap iterations for non-mean stderrs, e.g. LAMBADA perplexity (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (few-shot sampling; default 0)")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint's; float32 for GGUF), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="execution device (default: cuda if present)")
    p.add_argument("--labels", default=None, help="comma-separated names of the models in the report")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace the report folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="run a recipe (YAML steps: prune, export, finetune, moefy, eval) on a model",
                       description="Validate the recipe, then run its steps in order; each step writes OUT/<i>-<step> "
                                   "and a rerun resumes after the last finished step.")
    p.add_argument("recipe", help="recipe file, e.g. recipes/wanda-2of4.yaml")
    p.add_argument("--model", required=True, help="hub id, model folder or .gguf file")
    p.add_argument("--out", required=True, help="run folder (one subfolder per step)")
    p.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE",
                   help="override a setting of every step of that kind, e.g. --set prune.nsamples=32 (repeatable)")
    p.add_argument("--device", default=None, help="execution device (default: cuda if present)")
    p.add_argument("--check", action="store_true", help="only validate the recipe and print its steps")
    p.add_argument("--overwrite", action="store_true", help="start again: remove the run folder first")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("moefy", help="split every gated FFN into shared + routed experts with a router (training-free)",
                       description="Factorise each SwiGLU/GeGLU FFN into experts and a closed-form router from "
                                   "calibration activations; the output folder loads with llmsparse.load or "
                                   "transformers (trust_remote_code=True).")
    _add_model_args(p, required=False)
    p.add_argument("--experts", type=int, default=16, help="experts per FFN, shared ones included (default 16)")
    p.add_argument("--shared", type=int, default=4, help="how many of them are shared: always active (default 4)")
    p.add_argument("--top-k", type=int, default=8, help="routed experts each token runs (default 8: 75%% active)")
    p.add_argument("--calib", default=None, help="c4 | wikitext2 | PATH to .txt/.jsonl (default c4; demo: bundled)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 32; demo 32)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512; demo 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and the clustering (default 0)")
    p.add_argument("--no-compensation", action="store_true",
                   help="a skipped expert contributes nothing (default: its calibration mean, folded into biases)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="then train experts and routers this many Trainer steps (default 0: no fine-tuning)")
    p.add_argument("--finetune-data", choices=FINETUNE_DATA, default="fresh",
                   help="fresh (default): steps x 4 new windows of --calib, each seen once; calibration: the "
                        "calibration windows again (they overfit when few)")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning peak learning rate (default 1e-4)")
    p.add_argument("--out", default=None, help="output folder (default: <model name>-moe<E>s<S>k<K>)")
    p.add_argument("--save-format", choices=SAVE_FORMATS, default="dense",
                   help="dense (default) or compact (pruned experts in their smallest format; llmsparse.load)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=cmd_moefy)
    return parser


def _given(value, default):
    """The user's value when one was given (0 and '' included, so that the config refuses them), else the default."""
    return default if value is None else value


def _version() -> str:
    from . import __version__

    return __version__


def _default_out(model: str | None, method: str, pattern) -> str:
    from pathlib import Path

    if model is None:
        return DEMO["out"]
    name = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return f"{name}-{method}-{str(pattern).replace(':', 'of')}"


def cmd_prune(args) -> int:
    from pathlib import Path

    from .checkpoint import save_pruned, shard_size
    from .config import PruneConfig
    from .devices import execution_device
    from .models import DEMO_TEXT, load_model, parse_max_memory
    from .outputs import check_output_dir
    from .progress import say
    from .pruner import prune

    demo = args.model is None
    config = PruneConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        calib=_given(args.calib, str(DEMO_TEXT) if demo else "c4"),
        nsamples=_given(args.nsamples, DEMO["nsamples"] if demo else 128),
        seqlen=_given(args.seqlen, DEMO["seqlen"] if demo else 2048),
        seed=args.seed, ignore=args.ignore, calib_batch_size=args.calib_batch_size, scope=args.scope,
        expert_calibration=args.expert_calibration,
        blocksize=args.blocksize, percdamp=args.percdamp, allocation=args.allocation, owl_m=args.owl_m,
        owl_lambda=args.owl_lambda, refine=args.refine, refine_max_cycles=args.refine_max_cycles,
        refine_threshold=args.refine_threshold, refine_var_power=args.refine_var_power,
        refine_iters=args.refine_iters,
    )
    recipe = (args.method + ("-owl" if args.allocation == "owl" else "")
              + (f"-{args.refine.replace(',', '-')}" if args.refine else ""))
    out = args.out or _default_out(args.model, recipe, config.parsed_pattern())
    check_output_dir(out, args.overwrite)
    execution_device(args.device)
    shard_size(args.max_shard_size)
    verbose = not args.quiet
    if demo:
        say("no model given: pruning the bundled stories260K demo model on its bundled TinyStories sample", verbose)
    work = None if args.no_checkpoint else f"{str(out).rstrip('/')}.llmsparse-work"
    if args.resume and (work is None or not Path(work, "state.json").exists()):
        say(f"--resume: no unfinished run found in {work}; starting from the first layer", verbose)
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device_map=args.device_map,
                                  max_memory=parse_max_memory(args.max_memory), offload_folder=args.offload_folder)
    report = prune(model, tokenizer, config, device=args.device, progress=verbose,
                   offload_activations=args.offload_activations, checkpoint_dir=work, resume=args.resume)
    manifest = {"model": args.model or "stories260K (bundled demo)", "gguf_file": args.gguf_file,
                "dtype": str(next(model.parameters()).dtype), **report.to_json()}
    save_pruned(model, tokenizer, out, manifest, save_format=args.save_format, overwrite=args.overwrite,
                max_shard_size=args.max_shard_size)
    say(f"saved to {out} ({args.save_format})", verbose)
    return 0


def cmd_export(args) -> int:
    from .checkpoint import export
    from .progress import say

    out = export(args.folder, args.out, args.save_format, overwrite=args.overwrite,
                 max_shard_size=args.max_shard_size, dtype=args.dtype)
    say(f"exported {args.folder} to {out} ({args.save_format})", not args.quiet)
    return 0


def cmd_inspect(args) -> int:
    from .sizes import inspect_folder

    report = inspect_folder(args.folder)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0


def cmd_ppl(args) -> int:
    from .data import read_text
    from .models import load_model
    from .perplexity import perplexity, tokenize_text
    from .devices import execution_device

    text = read_text(args.text)
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype)
    device = execution_device(args.device)
    model.to(device)
    result = perplexity(model, tokenize_text(tokenizer, text), seqlen=args.seqlen, max_windows=args.max_windows,
                        batch_size=args.batch_size, device=device)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.windows} windows of {result.seqlen} tokens "
              f"({result.tokens} predicted tokens)")
    return 0


def cmd_finetune(args) -> int:
    from .checkpoint import save_pruned
    from .data import load_documents
    from .devices import execution_device
    from .finetuning import finetune
    from .models import load_model
    from .outputs import check_output_dir
    from .progress import say
    from .training import read_manifest

    check_output_dir(args.out, args.overwrite)
    execution_device(args.device)
    manifest = read_manifest(args.model) or {}
    documents = load_documents(args.data)
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype)
    model, report = finetune(model, tokenizer, documents, steps=args.steps, seqlen=args.seqlen, lr=args.lr,
                             batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed, lora=args.lora,
                             manifest=manifest or None, device=args.device, progress=not args.quiet)
    save_pruned(model, tokenizer, args.out, {**manifest, "finetune": {**report.to_json(), "data": args.data}},
                overwrite=args.overwrite)
    say(report.summary(), not args.quiet)
    say(f"saved to {args.out}", not args.quiet)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import EvalSettings, evaluate

    settings = EvalSettings(
        tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
        data_path=args.data_path, ppl_text=None if args.no_ppl else args.ppl_text, ppl_seqlen=args.ppl_seqlen,
        ppl_windows=args.ppl_windows, bootstrap_iters=args.bootstrap_iters, seed=args.seed, dtype=args.dtype,
        device=args.device,
    )
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    evaluate(args.models, settings, args.out, overwrite=args.overwrite, progress=not args.quiet, labels=labels)
    return 0


def cmd_run(args) -> int:
    from .recipes import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.check:
        print(f"{args.recipe}: valid recipe {recipe.name!r}")
        for i, step in enumerate(recipe.steps, 1):
            print(f"  {i}. {step.kind}: {json.dumps(step.settings)}")
        return 0
    run_recipe(recipe, args.model, args.out, device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_moefy(args) -> int:
    from pathlib import Path

    from .devices import execution_device
    from .models import DEMO_TEXT, load_model
    from .moe import MoefyConfig, moefy
    from .moe_export import save_moefied
    from .outputs import check_output_dir
    from .progress import say

    demo = args.model is None
    config = MoefyConfig(
        experts=args.experts, shared=args.shared, top_k=args.top_k,
        calib=_given(args.calib, str(DEMO_TEXT) if demo else "c4"),
        nsamples=_given(args.nsamples, 32), seqlen=_given(args.seqlen, DEMO["seqlen"] if demo else 512),
        seed=args.seed, compensate=not args.no_compensation, finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr, finetune_data=args.finetune_data,
    )
    name = "stories260K" if demo else (Path(args.model.rstrip("/")).name.removesuffix(".gguf") or "model")
    out = args.out or f"{name}-moe{config.experts}s{config.shared}k{config.top_k}"
    check_output_dir(out, args.overwrite)
    execution_device(args.device)
    verbose = not args.quiet
    if demo:
        say("no model given: moefying the bundled stories260K demo model on its bundled TinyStories sample", verbose)
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype)
    report = moefy(model, tokenizer, config, device=args.device, progress=verbose)
    save_moefied(model, tokenizer, out, report, overwrite=args.overwrite, save_format=args.save_format)
    say(f"saved to {out} ({args.save_format}; report in moefy.json; load with llmsparse.load, or transformers "
        f"with trust_remote_code=True)", verbose)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        from .progress import quiet_transformers

        quiet_transformers()
    try:
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
