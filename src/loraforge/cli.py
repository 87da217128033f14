"""The `loraforge` command: parse arguments and config, call one function, print.

A user's mistake ends in one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from loraforge.config import (DEFAULT_MODEL, TrainConfig, build_config, load_yaml, parse_bool, parse_mapping,
                              parse_targets)
from loraforge.errors import LoraforgeError

log = logging.getLogger("loraforge")
_FLAG_TYPES = {"int": int, "float": float, "bool": parse_bool}


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field, typed and documented from the dataclass; unset flags stay out of the namespace."""
    group = parser.add_argument_group("options (also settable in the YAML file; flags win)")
    for f in dataclasses.fields(cls):
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           type=_FLAG_TYPES.get(f.type, str), metavar=f.name.upper(),
                           help=f.metadata["help"].replace("%", "%%"))  # argparse formats help with %


def _cmd_train(args: argparse.Namespace) -> int:
    from loraforge.train import resume_config, train

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume:
        if args.config:
            raise LoraforgeError("--resume takes the run's own train_config.yaml; give flags, not a config file")
        cfg = resume_config(args.resume, flags)
    else:
        options = load_yaml(args.config) if args.config else {}
        try:
            cfg = build_config(TrainConfig, {**options, **flags}, source=args.config or "command line")
        except LoraforgeError as err:  # name what the user typed: --max-steps, not option 'max_steps'
            raise LoraforgeError(re.sub(r"option '(\w+)'", lambda m: f"--{m.group(1).replace('_', '-')}"
                                        if m.group(1) in flags else m.group(0), str(err))) from None
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # start torchrun, which runs this command N times
        if cfg.batch_size % args.nproc:
            raise LoraforgeError(f"--batch-size {cfg.batch_size} is the global batch: it must divide by --nproc "
                                 f"{args.nproc}; use a multiple of {args.nproc}")
        return _torchrun(args.nproc, args.argv)
    result = train(cfg, resume=bool(args.resume), progress=not args.quiet)
    if cfg.per_user:
        for user, run in result.items():
            s = run.summary
            print(f"{user}: {s['steps']} steps, final loss {s['final_loss']:.4f}, {s['tokens_per_second']:.0f} tokens/s")
        print(f"{len(result)} adapters written to {cfg.output}/<{cfg.per_user}>/; use them with loraforge generate "
              f"--adapters {cfg.output} --adapter NAME")
        return 0
    s = result.summary
    print(f"adapter written to {cfg.output}: {s['steps']} steps, final loss {s['final_loss']:.4f}, "
          f"{s['tokens_per_second']:.0f} tokens/s, peak RSS {s['peak_rss_mb']:.0f} MB")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node N -m loraforge <argv without --nproc>`: N processes on this machine,
    one gloo (CPU) or nccl (GPU) group; the options were checked here first, so a mistake fails once, with exit 2."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "--", "loraforge", *rest]  # "--": torchrun's parser must not read our flags (--r would look like its --role)
    logging.getLogger("loraforge").info("starting %d processes: %s", nproc, " ".join(cmd[1:]))
    return subprocess.call(cmd)


def prompt_ids(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """The prompt as ids: through the chat template exactly as training renders it (with `system` as the system
    turn, if given), or as plain text."""
    from loraforge.data import encode_prompt, has_chat_template

    if chat:
        if not has_chat_template(tokenizer):
            raise LoraforgeError("--chat: this model's tokenizer has no chat template; drop --chat")
        return encode_prompt(prompt, "", tokenizer, system=system)
    if system is not None:
        raise LoraforgeError("--system goes with --chat: a plain-text prompt has no system turn")
    return list(tokenizer(prompt)["input_ids"])


def _one(values: list[str] | None, flag: str, why: str) -> str | None:
    """The single value of a flag that may not repeat; a repeat is an error, never last-one-wins."""
    if values and len(values) > 1:
        raise LoraforgeError(f"{flag} was given {len(values)} times ({', '.join(values)}); {why}")
    return values[0] if values else None


def _cmd_generate(args: argparse.Namespace) -> int:
    from loraforge.infer import InferenceSession, SamplingParams, generate_many
    from loraforge.infer.store import AdapterStore

    names = args.adapter or []
    if args.adapters:  # a store: --adapter names adapters in it
        session = InferenceSession.open(args.model, dtype=args.dtype, device=args.device)
        store = AdapterStore(args.adapters, session, max_resident_mb=args.max_resident_mb)
        names = store.ensure(names)  # the names the session holds them by
    else:  # --adapter gives folders, each named by its last path part
        session = InferenceSession.open(args.model, names, dtype=args.dtype, device=args.device)
        names = list(session.adapters)
    greedy = args.temperature is None
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0 if greedy else args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    rows = names or [None]
    prompts = []
    for name in rows:  # each adapter gets its own system prompt: the one it was trained with, unless --system
        system = args.system if args.system is not None else session.system_prompt(name)
        prompts.append(prompt_ids(session.tokenizer, args.prompt, args.chat, system if args.chat else None))
    outputs = generate_many(session, prompts, params, rows)  # one mixed batch
    for name, ids in zip(rows, outputs):
        text = session.tokenizer.decode(ids, skip_special_tokens=True).strip()
        print(f"[{name}]\n{text}\n" if len(rows) > 1 else text)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from loraforge.lora import LoraConfig, LoraModel
    from loraforge.models import describe_modules, load_model

    model, _ = load_model(args.model)
    print(f"{type(model).__name__} ({model.config.model_type})")
    for path, kind, shape in describe_modules(model):
        print(f"  {path:<60} {kind:<14} {tuple(shape)}")
    lora_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=args.target_modules)
    lm = LoraModel(model, lora_config)
    print(f"targets: {lora_config.target_modules or 'default'} -> {len(lm.layers)} layers: "
          f"{', '.join(sorted({p.rsplit('.', 1)[-1] for p in lm.layers}))}")
    print(f"with r={args.r}: {lm.report()}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LoraforgeError(f"--output {output} exists and is not an empty folder; give a new folder or remove it")
    from loraforge.lora import load_adapter, read_adapter_config
    from loraforge.models import load_model

    adapter = _one(args.adapter, "--adapter", "merge folds one adapter into its base (run merge once per adapter)")
    model_name = args.model or read_adapter_config(adapter).base_model_name_or_path or DEFAULT_MODEL
    model, tokenizer = load_model(model_name)
    merged = load_adapter(model, adapter).merge_and_unload()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:  # built beside its place and renamed in: never half a model folder
        merged.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        output.rmdir() if output.exists() else None
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model written to {args.output}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from loraforge.infer.predict import predict_file

    columns = parse_mapping(args.columns) if args.columns else None
    adapter = _one(args.adapter, "--adapter", "predict runs one adapter; to compare several use loraforge eval")
    result = predict_file(args.data, model=args.model, adapter=adapter, recipe=args.recipe, task=args.task,
                          columns=columns, file_format=args.file_format, max_examples=args.max_examples,
                          batch_size=args.batch_size, max_length=args.max_length,
                          max_new_tokens=args.max_new_tokens, output=args.output, dtype=args.dtype,
                          device=args.device)
    where = f", written to {args.output}" if args.output else ""
    print(f"{len(result.predictions)} predictions{where}")
    if result.scores is None:
        print("no record has a reference, so nothing is scored")
    else:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items())
        print(f"{result.metric} on {result.scored} records: {scores}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from loraforge.eval.report import comparison_table
    from loraforge.eval.run import EvalConfig, run_eval

    options = {k: getattr(args, k) for k in ("data", "recipe", "model", "task", "file_format", "data_format",
                                             "max_examples", "few_shot", "few_shot_data", "seed", "num_beams",
                                             "max_new_tokens", "batch_size", "max_length", "dtype", "device", "threads",
                                             "samples", "output")}
    columns = parse_mapping(args.columns) if args.columns else None
    result = run_eval(EvalConfig(**options, adapters=tuple(args.adapter), columns=columns))
    print(comparison_table(result.models))
    print(f"written to {args.output}: " + ", ".join(path.name for path in result.files.values()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from loraforge.demo import run_demo

    run_demo(steps=args.steps, output=Path(args.output))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from loraforge.serve.main import serve

    return serve(args.model, args.adapters, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
                 device=args.device, max_resident_mb=args.max_resident_mb, max_batch=args.max_batch,
                 max_queue=args.max_queue, max_tokens_cap=args.max_tokens_cap, max_body_kb=args.max_body_kb)


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="auto: bfloat16 where this CPU/GPU runs it natively (much faster), else float32")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description="Fine-tune LLMs with LoRA, on a CPU or a GPU.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    quiet = argparse.ArgumentParser(add_help=False)  # -q works before or after the subcommand
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and errors on stderr")

    p = sub.add_parser("train", parents=[quiet], help="fine-tune a LoRA adapter on a data file")
    p.add_argument("config", nargs="?", help="YAML file of options (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint")
    p.add_argument("--nproc", type=int, default=1, help="train in N processes on this machine (torchrun, DDP or "
                                                        "FSDP2 by --strategy); --batch-size is the global batch")
    _add_config_flags(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("generate", parents=[quiet], help="generate text with a base model and optionally adapters (one batch)")
    p.add_argument("--model", help=f"base model (default: the adapters' base, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", metavar="DIR_OR_NAME",
                   help="adapter folder, or a name in --adapters; repeat to answer with each (one mixed batch)")
    p.add_argument("--adapters", metavar="DIR", help="an adapter store: DIR/<name>/ (e.g. from train --per-user)")
    p.add_argument("--max-resident-mb", type=float, default=0, help="with --adapters: cap on resident adapters")
    p.add_argument("--prompt", required=True, help="the text to continue, or the user turn with --chat")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", help="with --chat: the system prompt (default: the one the adapter was trained "
                                    "with, else the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample with this temperature instead of greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (with --temperature)")
    _add_device_flags(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("inspect", parents=[quiet], help="list a model's layers and what LoRA would train")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--r", type=int, default=TrainConfig.r)
    p.add_argument("--target-modules", type=parse_targets, default=None)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("merge", parents=[quiet], help="fold an adapter into its base and write a plain transformers model")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--adapter", required=True, action="append", help="the adapter folder (once)")
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("predict", parents=[quiet], help="predict a data file with an encoder head or a decoder recipe, and score it")
    p.add_argument("--model", help="base model (default: the adapter's base)")
    p.add_argument("--adapter", action="append",
                   help="adapter folder (once); one with labels.json is a seq-cls/token-cls head")
    p.add_argument("--data", required=True, help="records to predict (any format `train` reads)")
    p.add_argument("--recipe", help="decoder: the task recipe (sst2, conll2003, squad, e2e, ...); head: reads records")
    p.add_argument("--task", choices=("seq-cls", "token-cls", "causal-lm"),
                   help="default: the adapter's (labels.json), else causal-lm")
    p.add_argument("--columns", help="field renames, ours=theirs: text=sentence")
    p.add_argument("--file-format", help="reader when the suffix does not say: jsonl, json, csv, tsv, text, conll")
    p.add_argument("--output", help="write one JSON line per record: prediction, reference, generated text")
    p.add_argument("--max-examples", type=int, default=0, help="predict only the first N records (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512, help="head: tokens per record; longer ones are cut")
    p.add_argument("--max-new-tokens", type=int, default=64, help="decoder: tokens generated per answer")
    _add_device_flags(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("eval", parents=[quiet], help="score a base model, few-shot prompts and adapters on the same records; report")
    p.add_argument("--model", help=f"base model (default: the first adapter's base, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapter folder to compare; repeat for several (each on its own base unless --model)")
    p.add_argument("--data", required=True, help="records to score, e.g. a dev split (never the official test)")
    p.add_argument("--recipe", help="task recipe (e2e, sst2, conll2003, squad, ...); lm or none: perplexity")
    p.add_argument("--task", choices=("generate", "text"),
                   help="generate and score with the recipe's metric, or text: perplexity (default: by recipe)")
    p.add_argument("--columns", help="field renames, ours=theirs: text=sentence")
    p.add_argument("--file-format", help="reader when the suffix does not say: jsonl, json, csv, tsv, text, conll")
    p.add_argument("--data-format", help="record shape for --task text without a recipe (default: detected)")
    p.add_argument("--max-examples", type=int, default=0,
                   help="score the first N examples (records sharing an input count once for BLEU/ROUGE/QA)")
    p.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="also score the base model with K in-context examples from --few-shot-data")
    p.add_argument("--few-shot-data", metavar="FILE",
                   help="where the K examples come from, e.g. the training file (scored prompts are skipped)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy; more = beam search")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    p.add_argument("--max-length", type=int, default=512, help="text task: tokens per example or chunk")
    _add_device_flags(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = one per core)")
    p.add_argument("--samples", type=int, default=8, help="examples shown side by side in the report")
    p.add_argument("--output", default="runs/eval",
                   help="folder for results.json, predictions.jsonl, report.md, report.html and plots")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("serve", parents=[quiet], help="serve the base and an adapter store over the OpenAI API (model = adapter name)")
    p.add_argument("--model", help=f"base model, a name or a folder (default: {DEFAULT_MODEL})")
    p.add_argument("--adapters", metavar="DIR", help="adapter store: DIR/<name>/, each served as model <name>")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the log says which)")
    p.add_argument("--api-key", help="clients send 'Authorization: Bearer KEY' (default: $LORAFORGE_API_KEY)")
    p.add_argument("--max-resident-mb", type=float, default=0, help="cap on adapters held in memory (0: none)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body; more gets 413")
    _add_device_flags(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", parents=[quiet], help="fine-tune the default model on the bundled sample and compare answers")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--output", default="runs/demo")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="loraforge: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise before our own lines
    try:
        return args.func(args)
    except LoraforgeError as err:
        # One line, as promised above, even for messages built of several (e.g. a layer summary).
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"loraforge: error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("loraforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
