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
    if quant not in MERGED_TYPES:
        raise LoraforgeError(f"--quant {quant}: choose one of {', '.join(MERGED_TYPES)}")
    weights = read_adapter(adapter)
    if base_model is None:
        from loraforge.models import load_model  # noqa: PLC0415

        base_model, _ = load_model(str(base_gguf))
    updates = _updates(weights, base_model.config)
    by_name = {name: (path, a, b) for path, (name, a, b, _) in updates.items()}
    reader = GGUFReader(base_gguf)
    writer = GGUFWriter(None, "llama")
    writer.add_file_type(FILE_TYPES[quant])
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue  # written above
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    qtype = MERGED_TYPES[quant]
    dot = true_sq = kept_sq = 0.0
    nbytes = 0
    for tensor in reader.tensors:
        if tensor.name not in by_name:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)  # as it was
            nbytes += tensor.n_bytes
            continue
        path, a, b = by_name[tensor.name]
        dense = base_model.get_submodule(path).weight.detach().float()
        kind = tensor.name.split(".")[2]
        if kind in PERMUTED:
            dense = permute_rows(dense, getattr(base_model.config, PERMUTED[kind]))
        update = b @ a * (weights.config.lora_alpha / a.shape[0])  # (out, in), GGML row order
        data, used = _encode((dense + update).numpy(), qtype)
        kept = torch.from_numpy(gguf.quants.dequantize(data, used).astype(np.float32)).view_as(dense) - dense
        dot += float((kept * update).sum())
        true_sq += float((update * update).sum())
        kept_sq += float((kept * kept).sum())
        writer.add_tensor(tensor.name, data, raw_dtype=used)
        nbytes += data.nbytes
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write(writer, output)
    retention = dot / max((true_sq * kept_sq) ** 0.5, 1e-30)
    return Export(output, len(reader.tensors), nbytes, retention)
