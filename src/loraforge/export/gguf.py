"""GGUF out, for llama.cpp and Ollama: an adapter on its base GGUF, or a whole merged model.

An adapter GGUF is what llama.cpp's `convert_lora_to_gguf.py` writes and `src/llama-adapter.cpp` loads:

- `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` (float32), `general.architecture` the base's;
- per adapted weight `<base tensor>.lora_a` (r, in) and `.lora_b` (out, r), e.g. `blk.0.attn_q.weight.lora_a`;
- llama.cpp scales every pair by alpha / rank, rank = lora_b's ne[0] (its r columns), so rsLoRA and per-module
  rank/alpha patterns are folded into B: B' = B · s_module / (alpha / r_module);
- llama.cpp's converter permutes the rows of q and k of llama models (rotary pairs interleaved); the update B·A gets
  the same row permutation, which is a permutation of B's rows;
- refused, as the loader would refuse or ignore them: DoRA, embedding targets, trained copies of modules, trained
  biases, an lm_head update on a model whose lm_head is the tied embedding, architectures other than llama.

A merged GGUF takes every tensor and every metadata key (tokenizer, chat template, hyperparameters) of the base's own
GGUF, with the adapted weights replaced by base + update in `quant` (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1);
the weights the adapter does not touch keep the base file's own blocks, exactly.
The update is added to the weight the adapter was trained on (the dense load of the GGUF, which is its blocks
dequantized exactly). Re-quantizing to 4 or 5 bits loses most of a small update; the retention of the update
(cosine between the update the file now holds and the true one) is measured and returned, for every quant.

A base with no GGUF of its own (a transformers folder of a llama-architecture model) is written whole by
`export_merged_model`: llama.cpp's hyperparameter keys from its config, its byte-level BPE tokenizer (tokens and their
types, merges, the pre-tokenizer's name, special ids, chat template), every weight under its GGUF name with q and k
in GGML's row order, norms in F32. Rotary scaling and other tokenizer kinds are refused (llama.cpp's
convert_hf_to_gguf.py covers them). loraforge reads such a file back (`--model FILE.gguf`) as the weights it holds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from loraforge.errors import LoraforgeError
from loraforge.lora.adapter import AdapterWeights, atomic_write, read_adapter
from loraforge.lora.layer import lora_scaling

log = logging.getLogger("loraforge")

ADAPTER_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0}
MERGED_TYPES = {**ADAPTER_TYPES, "bf16": GGMLQuantizationType.BF16, "q4_0": GGMLQuantizationType.Q4_0,
                "q4_1": GGMLQuantizationType.Q4_1, "q5_0": GGMLQuantizationType.Q5_0,
                "q5_1": GGMLQuantizationType.Q5_1}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}
PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}  # llama.cpp's converter, llama only


@dataclass(frozen=True)
class Export:
    """What an export wrote: the file, its tensors, and for a merged model the update's retention."""

    path: Path
    tensors: int
    nbytes: int
    retention: float | None = None  # cosine(update in the file, true update) over all adapted weights


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: rows of q/k from transformers' rotate-half order to GGML's interleaved pairs
    (the inverse of transformers' `_reverse_permute_weights`)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def gguf_names(config, n_layers: int) -> gguf.TensorNameMap:
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(config.model_type)
    if config.model_type != "llama" or arch_id is None:
        raise LoraforgeError(f"GGUF export supports llama-architecture bases (SmolLM2, Llama, TinyLlama); this base is "
                             f"{config.model_type!r}")
    return gguf.get_tensor_name_map(arch_id, n_layers)


def _updates(weights: AdapterWeights, config) -> dict[str, tuple[str, torch.Tensor, torch.Tensor, float]]:
    """{module path: (gguf weight name, A (r, in), B' (out, r) in GGML row order with the scaling folded for
    alpha = lora_alpha, the module's scaling)} for every adapted weight, or a refusal that says why."""
    cfg = weights.config
    where = f"adapter {weights.source}"
    cfg.check_on_original_base(where)
    from loraforge.quant.loftq import has_moved_base  # noqa: PLC0415

    if has_moved_base(weights.source):
        raise LoraforgeError(f"{where} was trained on a LoftQ base of its own (loftq_base.safetensors), which no GGUF "
                             "base file holds: merge it (loraforge merge) and convert the merged folder with llama.cpp's "
                             "convert_hf_to_gguf.py")
    if cfg.use_dora:
        raise LoraforgeError(f"{where} uses DoRA, which llama.cpp cannot apply as an adapter; merge it instead "
                             "(loraforge export --merged)")
    if cfg.bias != "none" or cfg.modules_to_save:
        raise LoraforgeError(f"{where} trains {'biases' if cfg.bias != 'none' else 'whole modules'}, which a GGUF "
                             "adapter cannot carry; export it merged (--merged)")
    others = [k for k in weights.tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if others:
        raise LoraforgeError(f"{where} holds {others[0]} ({len(others)} tensors besides LoRA's A and B: embedding "
                             "targets or saved modules), which llama.cpp adapters do not carry; export it merged")
    names = gguf_names(config, config.num_hidden_layers)
    updates = {}
    for key in sorted(weights.tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight")
        if path == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise LoraforgeError(f"{where} adapts lm_head, which this base has tied to its embedding: llama.cpp has no "
                                 "lm_head tensor to apply it to. Train without lm_head, or export merged")
        name = names.get_name(path + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise LoraforgeError(f"{where}: {path} has no GGUF tensor name in a {config.model_type} model")
        a, b = weights.tensors[key].float(), weights.tensors[f"{path}.lora_B.weight"].float()
        r, alpha = cfg.rank_and_alpha(path)
        scaling = lora_scaling(r, alpha, cfg.use_rslora)
        b = b * (scaling / (cfg.lora_alpha / r))  # llama.cpp applies lora_alpha / r
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if kind in PERMUTED:
            b = permute_rows(b, getattr(config, PERMUTED[kind]))
        updates[path] = (name, a, b, scaling)
    if not updates:
        raise LoraforgeError(f"{where} holds no LoRA weights")
    return updates


def _encode(array: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """`array` (fp32, 2-D) as `qtype`, or F16 when its rows do not fill whole blocks (a rank of 16 under Q8_0)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return array.astype(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), GGMLQuantizationType.F16
    return gguf.quants.quantize(array, qtype), qtype


def _write(writer: GGUFWriter, path: Path) -> None:
    """Write through a temp file beside `path`, renamed in (`atomic_write`): never half a file."""
    def write(tmp: str) -> None:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)


def export_adapter(adapter: str | Path, output: str | Path, *, dtype: str = "f16", base_config=None) -> Export:
    """The adapter in `adapter` as a llama.cpp LoRA GGUF at `output` (F32, F16 or Q8_0 tensors)."""
    if dtype not in ADAPTER_TYPES:
        raise LoraforgeError(f"--dtype {dtype}: an adapter GGUF takes one of {', '.join(ADAPTER_TYPES)}")
    weights = read_adapter(adapter)
    config = base_config or _base_config(weights)
    updates = _updates(weights, config)
    writer = GGUFWriter(None, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(weights.config.lora_alpha))
    nbytes = 0
    for name, a, b, _ in updates.values():
        for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
            data, qtype = _encode(tensor.numpy(), ADAPTER_TYPES[dtype])
            writer.add_tensor(name + suffix, data, raw_dtype=qtype)
            nbytes += data.nbytes
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write(writer, output)
    return Export(output, 2 * len(updates), nbytes)


def _base_config(weights: AdapterWeights):
    from transformers import AutoConfig  # noqa: PLC0415

    from loraforge.models import resolve_model  # noqa: PLC0415

    base = weights.config.base_model_name_or_path
    if not base:
        raise LoraforgeError(f"adapter {weights.source} does not say its base (base_model_name_or_path); give --model")
    return AutoConfig.from_pretrained(resolve_model(base), local_files_only=True)


def export_merged(adapter: str | Path, base_gguf: str | Path, output: str | Path, *, quant: str = "q8_0",
                  base_model=None) -> Export:
    """Base + update as one GGUF: every tensor and key of `base_gguf`, the adapted weights re-encoded in `quant`.

    `base_model` is the dense transformers model the adapter was trained on (default: the load of `base_gguf`)."""
    _check_quant(quant)
    weights = read_adapter(adapter)
    if base_model is None:
        from loraforge.models import load_model  # noqa: PLC0415

        base_model, _ = load_model(str(base_gguf))
    updates = _updates(weights, base_model.config)
    by_name = {name: (path, b @ a * (weights.config.lora_alpha / a.shape[0])) for path, (name, a, b, _) in
               updates.items()}
    reader = GGUFReader(base_gguf)
    writer = GGUFWriter(None, "llama")
    writer.add_file_type(FILE_TYPES[quant])
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue  # written above
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    kept = _Retention()
    nbytes = 0
    for tensor in reader.tensors:
        if tensor.name not in by_name:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)  # as it was
            nbytes += tensor.n_bytes
            continue
        path, update = by_name[tensor.name]
        dense = _ggml_rows(tensor.name, base_model.get_submodule(path).weight.detach().float(), base_model.config)
        nbytes += _add_merged(writer, tensor.name, dense, update, MERGED_TYPES[quant], kept)
    return _finish(writer, output, len(reader.tensors), nbytes, kept)


def export_merged_model(adapter: str | Path, base_model, tokenizer, output: str | Path, *, quant: str = "q8_0",
                        name: str | None = None) -> Export:
    """Base + update as one GGUF written from a transformers llama model (a base that has no GGUF of its own):
    llama.cpp's hyperparameter keys from its config, its byte-level BPE tokenizer (tokens, types, merges, special
    ids, chat template), every weight under GGUF's name and, for q and k, in GGML's row order. 2-D weights are
    encoded in `quant` (F16 where a row does not fill whole blocks), norms stay F32; adapted weights are base +
    update, with the update's retention measured as `export_merged` does."""
    _check_quant(quant)
    weights = read_adapter(adapter)
    config = base_model.config
    updates = _updates(weights, config)
    by_path = {path: b @ a * (weights.config.lora_alpha / a.shape[0]) for path, (_, a, b, _) in updates.items()}
    writer = GGUFWriter(None, "llama")
    writer.add_file_type(FILE_TYPES[quant])
    _llama_metadata(writer, config, name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    _tokenizer_metadata(writer, tokenizer, config.vocab_size)
    names = gguf_names(config, config.num_hidden_layers)
    kept = _Retention()
    nbytes = count = 0
    for key, tensor in base_model.state_dict().items():
        if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LoraforgeError(f"{key} of this {config.model_type} model has no GGUF tensor name; it cannot be "
                                 "exported")
        dense = _ggml_rows(gguf_name, tensor.detach().float(), config)
        if dense.dim() == 1:  # norms: F32, as llama.cpp's converter writes them
            writer.add_tensor(gguf_name, dense.numpy(), raw_dtype=GGMLQuantizationType.F32)
            nbytes += dense.numel() * 4
        else:
            update = by_path.get(key.removesuffix(".weight"))
            nbytes += _add_merged(writer, gguf_name, dense, update, MERGED_TYPES[quant], kept)
        count += 1
    return _finish(writer, output, count, nbytes, kept)


def _check_quant(quant: str) -> None:
    if quant not in MERGED_TYPES:
        raise LoraforgeError(f"--quant {quant}: choose one of {', '.join(MERGED_TYPES)}")


def _ggml_rows(gguf_name: str, weight: torch.Tensor, config) -> torch.Tensor:
    """`weight` with q/k rows in GGML's order (llama.cpp's converter permutes them); others as they are."""
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    return permute_rows(weight, getattr(config, PERMUTED[kind])) if kind in PERMUTED else weight


class _Retention:
    """cosine(update the file holds, true update) summed over every adapted weight."""

    def __init__(self) -> None:
        self.dot = self.true_sq = self.kept_sq = 0.0

    def add(self, kept: torch.Tensor, update: torch.Tensor) -> None:
        self.dot += float((kept * update).sum())
        self.true_sq += float((update * update).sum())
        self.kept_sq += float((kept * kept).sum())

    @property
    def value(self) -> float | None:
        return self.dot / max((self.true_sq * self.kept_sq) ** 0.5, 1e-30) if self.true_sq else None


def _add_merged(writer: GGUFWriter, name: str, dense: torch.Tensor, update: torch.Tensor | None,
                qtype: GGMLQuantizationType, kept: _Retention) -> int:
    """dense (+ update) encoded as `qtype` into `writer`; its bytes. The update kept is measured on the way."""
    merged = dense if update is None else dense + update
    data, used = _encode(merged.numpy(), qtype)
    if update is not None:
        stored = torch.from_numpy(gguf.quants.dequantize(data, used).astype(np.float32)).view_as(dense)
        kept.add(stored - dense, update)
    writer.add_tensor(name, data, raw_dtype=used)
    return data.nbytes


def _finish(writer: GGUFWriter, output: str | Path, tensors: int, nbytes: int, kept: _Retention) -> Export:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write(writer, output)
    return Export(output, tensors, nbytes, kept.value)


def _llama_metadata(writer: GGUFWriter, config, name: str) -> None:
    """The hyperparameters llama.cpp reads for `general.architecture = llama`."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise LoraforgeError(f"this base scales its rotary embedding ({rope_type if rope_type != 'default' else scaling}),"
                             " which the GGUF export does not write; convert the merged folder (loraforge merge) with "
                             "llama.cpp's convert_hf_to_gguf.py")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(config, "rope_theta", None) or 10000.0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _tokenizer_metadata(writer: GGUFWriter, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp reads it (`tokenizer.ggml.model = gpt2`). The pre-tokenizer name tells
    llama.cpp how to split text before BPE: "smollm" (digits one by one, then GPT-2's regex) or "gpt-2"."""
    import json  # noqa: PLC0415

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if spec is None or spec["model"]["type"] != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise LoraforgeError("the GGUF export writes byte-level BPE tokenizers (GPT-2's, SmolLM's, Llama 3's); this "
                             "base's is another kind. Merge it (loraforge merge) and convert that folder with llama.cpp's "
                             "convert_hf_to_gguf.py")
    pre = "smollm" if _splits_digits(spec.get("pre_tokenizer")) else "gpt-2"
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        if i >= vocab_size:
            raise LoraforgeError(f"token {text!r} has id {i}, beyond the model's vocab_size {vocab_size}")
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special or added.get(text) else \
            gguf.TokenType.USER_DEFINED if text in added else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        value = getattr(tokenizer, f"{token}_token_id", None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _byte_level(pre: dict | None) -> bool:
    if not pre:
        return False
    return pre["type"] == "ByteLevel" or (pre["type"] == "Sequence" and any(_byte_level(p) for p in pre["pretokenizers"]))


def _splits_digits(pre: dict | None) -> bool:
    if not pre:
        return False
    if pre["type"] == "Digits":
        return bool(pre.get("individual_digits"))
    return pre["type"] == "Sequence" and any(_splits_digits(p) for p in pre["pretokenizers"])
