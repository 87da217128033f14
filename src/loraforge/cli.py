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

from loraforge.config import DEFAULT_MODEL, TrainConfig, build_config, load_yaml, parse_bool, parse_mapping
from loraforge.errors import LoraforgeError
from loraforge.options import (CombineOptions, DemoOptions, ExportOptions, GenerateOptions, InspectOptions, MergeOptions,
                               PredictOptions, RouterOptions, ServeOptions, from_namespace)

log = logging.getLogger("loraforge")
_FLAG_TYPES = {"int": int, "float": float}
_YES_NO = {"type": parse_bool, "nargs": "?", "const": True, "metavar": "true|false"}
"""A yes/no flag stands alone (--overwrite) or takes a value (--packing false)."""


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field, typed and documented from the dataclass; unset flags stay out of the namespace."""
    group = parser.add_argument_group("options (also settable in the YAML file; flags win)")
    for f in dataclasses.fields(cls):
        kind = _YES_NO if f.type == "bool" else {"type": _FLAG_TYPES.get(f.type, str), "metavar": f.name.upper()}
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           help=f.metadata["help"].replace("%", "%%"), **kind)  # argparse formats help with %


def _add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of a subcommand's options dataclass (`loraforge.options`), typed and documented there."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        group, flag = meta.pop("group", None), meta.pop("flag", f.name)
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = parser if group is None else groups[group]
        kwargs = {"help": meta.pop("help").replace("%", "%%"), **meta}
        if f.type == "bool" and "action" not in kwargs:  # as a config's: --base, or --base false
            kwargs.update(_YES_NO)
        elif kwargs.get("action") != "store_true":
            kwargs["type"] = _OPTION_TYPES[f.type]
        if kwargs.get("action") != "append":
            kwargs["default"] = f.default
        target.add_argument(f"--{flag.replace('_', '-')}", dest=f.name, **kwargs)


_OPTION_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "float | None": float,
                 "int | None": int, "list[str] | None": str, "list[str] | str | None": str, "tuple[str, ...]": str,
                 "dict[str, str] | None": str}


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
        from loraforge.train.distributed import check_global_batch

        check_global_batch(cfg.batch_size, args.nproc)  # here, so that a mistake fails once, not in every rank
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
    log.info("starting %d processes: %s", nproc, " ".join(cmd[1:]))
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


def _open_adapters(args: GenerateOptions | RouterOptions, max_resident_mb: float = 0.0):
    """The session of --model with the --adapter given (folders, or names in the --adapters store); the session and
    each adapter's name as given and as the session holds it."""
    from loraforge.infer import InferenceSession
    from loraforge.infer.store import AdapterStore

    names = args.adapter or []
    if args.adapters:  # a store: --adapter names adapters in it
        session = InferenceSession.open(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
        store = AdapterStore(args.adapters, session, max_resident_mb=max_resident_mb)
        return session, list(names), store.ensure(names)  # the names the session holds them by
    # --adapter gives folders, each named by its last path part
    session = InferenceSession.open(args.model, names, dtype=args.dtype, device=args.device, quantize=args.quantize)
    return session, list(session.adapters), list(session.adapters)


def _cmd_generate(args: GenerateOptions) -> int:
    from loraforge.infer import SamplingParams, generate_many

    session, given, names = _open_adapters(args, args.max_resident_mb)
    greedy = args.temperature is None
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0 if greedy else args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.router:
        return _generate_routed(args, session, dict(zip(given, names)), params)
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


def _generate_routed(args: GenerateOptions, session, resident: dict[str, str], params) -> int:
    """`generate --router DIR`: the router picks the adapter that answers the prompt (or the base)."""
    from loraforge.infer import generate_many
    from loraforge.infer.router import Router

    router = Router.load(args.router)
    router.check(session)
    router.require_adapters(list(resident))
    # the route is read from the prompt as no adapter changes it: --system, else the template's own system turn
    ids = prompt_ids(session.tokenizer, args.prompt, args.chat, args.system if args.chat else None)
    probabilities = router.probabilities(session, [ids])[0]  # (C,)
    chosen = router.classes[int(probabilities.argmax())]
    name = resident.get(chosen)  # None: the "base" class
    system = session.system_prompt(name)
    if args.chat and args.system is None and system is not None:  # the routed adapter's own system prompt
        ids = prompt_ids(session.tokenizer, args.prompt, True, system)
    out = generate_many(session, [ids], params, [name])[0]
    text = session.tokenizer.decode(out, skip_special_tokens=True).strip()
    print(f"[{chosen} p={float(probabilities.max()):.3f}]\n{text}")
    return 0


def _cmd_router(args: RouterOptions) -> int:
    from loraforge.infer.router import BASE, RouterData, train_router

    session, given, _ = _open_adapters(args)
    specs = args.datasets()
    base = specs.pop(BASE, None)
    missing = [name for name in given if name not in specs]
    if missing:
        raise LoraforgeError(f"no --data for adapter {', '.join(missing)}: give --data NAME=FILE for each --adapter "
                             f"(adapters: {', '.join(given)})")
    order = given + [name for name in specs if name not in given]  # an unknown name is refused by train_router
    router = train_router(session, [RouterData(name, **specs[name]) for name in order],
                          base_data=RouterData(BASE, **base) if base else None, max_examples=args.max_examples,
                          val_split=args.val_split, seed=args.seed, l2=args.l2, max_length=args.max_length,
                          layer=args.layer)
    router.save(args.output)
    trained = sum(c["train"] for c in router.counts.values())
    held = sum(c["val"] for c in router.counts.values())
    print(f"router written to {args.output}: classes {', '.join(router.classes)}; {trained} prompts trained on, "
          f"{held} held out")
    if router.accuracy is None:
        print("nothing held out (--val-split 0): accuracy not measured")
    else:
        per_class = ", ".join(f"{name} {'-' if acc is None else f'{acc:.4f}'} ({router.counts[name]['val']})"
                              for name, acc in router.per_class_accuracy.items())
        print(f"validation accuracy {router.accuracy:.4f}; per class: {per_class}")
    return 0


def _cmd_inspect(args: InspectOptions) -> int:
    from loraforge.lora import LoraConfig, LoraModel
    from loraforge.models import describe_modules, gguf_file_of, load_model, resolve_model

    model, _ = load_model(args.model)
    source = gguf_file_of(args.model)
    print(f"{type(model).__name__} ({model.config.model_type}) at {resolve_model(args.model).resolve()}"
          + (f", converted from {source}" if source else ""))
    for path, kind, shape in describe_modules(model):
        print(f"  {path:<60} {kind:<14} {tuple(shape)}")
    lora_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=args.target_modules)
    lm = LoraModel(model, lora_config)
    print(f"targets: {lora_config.target_modules or 'default'} -> {len(lm.layers)} layers: "
          f"{', '.join(sorted({p.rsplit('.', 1)[-1] for p in lm.layers}))}")
    print(f"with r={args.r}: {lm.report()}")
    return 0


def _cmd_merge(args: MergeOptions) -> int:
    import shutil
    import tempfile

    import torch

    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LoraforgeError(f"--output {output} exists and is not an empty folder; give a new folder or remove it")
    from loraforge.config import adapter_quantize
    from loraforge.lora import load_adapter
    from loraforge.lora.adapter import follow_umask
    from loraforge.models import adapter_base, load_model, saved_dtype
    from loraforge.quant.loftq import apply_moved_base
    from loraforge.quant.model import dequantize_model

    adapter = _one(args.adapter, "--adapter", "merge folds one adapter into its base (run merge once per adapter)")
    model_name = args.model or adapter_base(adapter) or DEFAULT_MODEL
    quantize = adapter_quantize([adapter])  # merge onto the base it was trained on: the dequantized packed one
    model, tokenizer = load_model(model_name, quantize=quantize)
    apply_moved_base(model, adapter)  # LoftQ with loftq_iter > 1 trained on a base of its own
    merged = load_adapter(model, adapter).merge_and_unload()
    if dequantize_model(merged):  # the layers the adapter did not touch, dense too: a plain model folder
        print(f"the adapter was trained on a {quantize} base: merged onto its dequantized weights (not re-quantized)")
    dtype = saved_dtype(model_name) if args.dtype == "auto" else getattr(torch, args.dtype)
    merged = merged.to(dtype)  # the merge itself ran in fp32
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:  # built beside its place and renamed in: never half a model folder
        merged.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        follow_umask(tmp)  # mkdtemp's 0700 and the writers' 0600 would hide it from a service of another user
        output.rmdir() if output.exists() else None
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model written to {args.output} ({str(dtype).removeprefix('torch.')})")
    return 0


def _cmd_export(args: ExportOptions) -> int:
    from loraforge.export.gguf import export_adapter, export_merged, export_merged_model
    from loraforge.export.ollama import write_modelfile
    from loraforge.models import adapter_base, gguf_file_of, load_model

    adapter = _one(args.adapter, "--adapter", "export writes one adapter (run it once per adapter)")
    base = args.model or adapter_base(adapter) or DEFAULT_MODEL
    base_gguf = gguf_file_of(base)
    if base_gguf is None and not args.merged:
        raise LoraforgeError(f"the base {base!r} is not a GGUF model, so llama.cpp has no base file to load an adapter "
                             "on. Export the merged model instead (--merged writes the whole model as one GGUF)")
    if args.merged:
        if base_gguf is not None:
            result = export_merged(adapter, base_gguf, args.output, quant=args.quant)
        else:
            model, tokenizer = load_model(base)
            result = export_merged_model(adapter, model, tokenizer, args.output, quant=args.quant)
        print(f"merged model written to {result.path} ({result.nbytes / 2**20:.1f} MiB of tensors, adapted weights "
              f"in {args.quant}); the update kept: cosine {result.retention:.4f} with the trained one"
              + ("" if result.retention > 0.9 else " (re-quantizing lost much of it: prefer q8_0 or f16)"))
    else:
        result = export_adapter(adapter, args.output, dtype=args.dtype)
        print(f"adapter written to {result.path} ({result.tensors} tensors, {result.nbytes / 2**20:.2f} MiB); load it "
              f"on {base_gguf}: llama-cli -m {base_gguf} --lora {result.path}")
    if args.ollama:
        modelfile = write_modelfile(Path(args.output), base_gguf, merged=args.merged)
        print(f"Ollama: {modelfile} (ollama create NAME -f {modelfile})")
    return 0


def _cmd_combine(args: CombineOptions) -> int:
    from loraforge.lora.combine import combine_adapters

    result = combine_adapters(args.adapter, args.output, args.method, args.weight_values(), rank=args.rank,
                              density=args.density, majority_sign=args.majority_sign, seed=args.seed)
    config = result.adapter.config
    ranks = f"r={config.r}" + (f", {len(config.rank_pattern)} modules by rank_pattern" if config.rank_pattern else "")
    print(f"{args.method} of {len(args.adapter)} adapters written to {args.output}: {ranks}, scaling 1")
    if result.errors:
        worst = max(result.errors, key=result.errors.get)
        print(f"SVD truncation, relative Frobenius error per module: max {result.errors[worst]:.4g} ({worst}), mean "
              f"{sum(result.errors.values()) / len(result.errors):.4g} over {len(result.errors)} modules")
    return 0


def _cmd_predict(args: PredictOptions) -> int:
    from loraforge.infer.predict import predict_file

    columns = parse_mapping(args.columns) if args.columns else None
    adapter = _one(args.adapter, "--adapter", "predict runs one adapter; to compare several use loraforge eval")
    result = predict_file(args.data, model=args.model, adapter=adapter, recipe=args.recipe, task=args.task,
                          columns=columns, metric=args.metric, instruction=args.instruction,
                          file_format=args.file_format, max_examples=args.max_examples,
                          batch_size=args.batch_size, max_length=args.max_length,
                          max_new_tokens=args.max_new_tokens, answer=args.answer, output=args.output,
                          dtype=args.dtype, device=args.device, quantize=args.quantize)
    where = f", written to {args.output}" if args.output else ""
    print(f"{len(result.predictions)} predictions{where}")
    if result.scores is None:
        print("no record has a reference, so nothing is scored")
    else:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items())
        print(f"{result.metric} on {result.scored} records: {scores}")
    return 0


def _cmd_eval(cfg) -> int:
    from loraforge.eval.report import comparison_table
    from loraforge.eval.run import run_eval

    if cfg.tasks:
        from loraforge.eval.multitask import run_multitask, table

        result = run_multitask(cfg)
        header, rows = table(result)
        print("\n".join(" | ".join(cells) for cells in [header, *rows]))
        print(f"written to {cfg.output}: " + ", ".join(path.name for path in result.files.values()))
        return 0
    result = run_eval(cfg)
    print(comparison_table(result.models))
    print(f"written to {cfg.output}: " + ", ".join(path.name for path in result.files.values()))
    return 0


def _cmd_demo(args: DemoOptions) -> int:
    from loraforge.demo import run_demo

    run_demo(steps=args.steps, output=Path(args.output))
    return 0


def _cmd_serve(options: ServeOptions) -> int:
    from loraforge.serve.main import serve

    return serve(options)


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

    from loraforge.eval.config import EvalConfig

    for name, cls, func, help_text in (
            ("generate", GenerateOptions, _cmd_generate,
             "generate text with a base model and optionally adapters (one batch)"),
            ("router", RouterOptions, _cmd_router,
             "train a router that picks, per prompt, the adapter (or the base) that answers it; print its accuracy"),
            ("serve", ServeOptions, _cmd_serve,
             "serve the base and an adapter store over the OpenAI API (model = adapter name)"),
            ("predict", PredictOptions, _cmd_predict,
             "predict a data file with an encoder head or a decoder recipe, and score it"),
            ("eval", EvalConfig, _cmd_eval,
             "score a base model, few-shot prompts and adapters on the same records; report"),
            ("inspect", InspectOptions, _cmd_inspect, "list a model's layers and what LoRA would train"),
            ("merge", MergeOptions, _cmd_merge, "fold an adapter into its base and write a plain transformers model"),
            ("export", ExportOptions, _cmd_export,
             "write an adapter (or the merged model) as GGUF for llama.cpp and Ollama"),
            ("combine", CombineOptions, _cmd_combine,
             "combine adapters trained on one base into one adapter (cat, linear, svd, ties, dare_*, ...)"),
            ("demo", DemoOptions, _cmd_demo, "fine-tune the default model on the bundled sample and compare answers")):
        p = sub.add_parser(name, parents=[quiet], help=help_text)
        _add_option_flags(p, cls)
        p.set_defaults(func=func, options=cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="loraforge: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise before our own lines
    try:
        return args.func(from_namespace(args.options, args) if hasattr(args, "options") else args)
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
