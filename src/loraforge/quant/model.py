"""Put a quantized base in place: every `nn.Linear` of a model's body becomes a `QuantLinear`.

The output head and classifier heads stay dense (QLoRA and bitsandbytes keep `lm_head` in 16/32 bits; SmolLM2's is
tied to the embedding), and so does the input embedding, except with `nf4-all` / `nf4-dq-all`: the input embedding
becomes a `QuantEmbedding` and the output head a `QuantLinear` (sharing the embedding's bytes when they are tied).
On a 1B Llama those two are 262 MB in bf16, more than the packed body; their NF4 error then reaches the logits too.
With `method="gguf"` the blocks come from the GGUF file the model was converted from, row for row: llama.cpp's
converter permutes the rows of q and k, and transformers un-permutes them on load (`LlamaTensorProcessor`), so the
same permutation is applied to the file's block rows, and every layer is checked to dequantize to exactly the dense
weight transformers made from the same file before the dense weight is dropped.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.quant import ggml, nf4
from loraforge.quant.linear import METHODS, QuantEmbedding, QuantLinear

logger = logging.getLogger("loraforge")

_HEADS = ("lm_head", "score", "classifier")


def body_linears(model: nn.Module) -> list[str]:
    """Paths of the `nn.Linear` layers a quantized base packs: all but the output head, classifier heads and the
    adapters' own layers (LoRA's A and B, trained copies of heads), when LoRA is already in."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out else None
    adapters = {id(sub) for m in model.modules() if getattr(m, "is_lora_wrapper", False)
                for name, child in m.named_children() if name not in ("base_layer", "original_module")
                for sub in child.modules()}
    return [path for path, m in model.named_modules() if type(m) is nn.Linear and m is not head
            and id(m) not in adapters and not set(path.split(".")) & set(_HEADS)]


def quantize_model(model: nn.Module, method: str, gguf_path: Path | None = None) -> dict[str, int]:
    """Replace the body's linears by packed ones (and with `-all` the input embedding and output head), in place; a
    summary {"layers", "dense_bytes", "packed_bytes"}."""
    if method not in METHODS or method == "none":
        raise LoraforgeError(f"unknown quantization {method!r}; use one of: {', '.join(METHODS)}")
    body_method = method.removesuffix("-all")
    blocks = _gguf_blocks(model, gguf_path) if method == "gguf" else {}
    dense = packed = layers = 0
    for path in body_linears(model):
        linear = model.get_submodule(path)
        if method == "gguf":
            if path not in blocks:
                continue
            fmt, rows = blocks[path]
            layer = QuantLinear(fmt, {"blocks": rows}, linear.in_features, linear.out_features, linear.bias,
                                linear.weight.dtype)
            if not torch.equal(layer.dequantize(linear.weight.dtype), linear.weight):
                raise LoraforgeError(f"GGUF blocks of {path} in {gguf_path} do not dequantize to the model's weight: "
                                     "the file and the converted model disagree; delete the loraforge cache "
                                     "folder of this model and load it again")
        else:
            layer = QuantLinear.from_linear(linear, body_method)
        dense += linear.weight.numel() * linear.weight.element_size()
        packed += layer.weight_bytes
        layers += 1
        model.set_submodule(path, layer.to(linear.weight.device).train(linear.training))  # eval stays eval
    if method.endswith("-all"):
        for d, p in _pack_embeddings(model, body_method):
            dense, packed, layers = dense + d, packed + p, layers + 1
    _own_memory(model)
    if layers == 0:
        raise LoraforgeError(f"--quantize {method}: no linear layer of {type(model).__name__} could be packed"
                             + (" (the GGUF file holds none of them in Q4_0/Q4_1/Q5_0/Q5_1/Q8_0)" if blocks == {}
                                and method == "gguf" else ""))
    logger.info("quantized %d layers to %s: %.1f MB -> %.1f MB", layers, method, dense / 1e6, packed / 1e6)
    return {"layers": layers, "dense_bytes": dense, "packed_bytes": packed}


def _pack_embeddings(model: nn.Module, method: str) -> list[tuple[int, int]]:
    """Pack the input embedding and the output head as NF4, in place (a tied head shares the embedding's bytes);
    (dense bytes, packed bytes) of each weight packed."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding or head is None or type(head) is not nn.Linear:
        raise LoraforgeError(f"--quantize {method}-all packs a plain input embedding and output head; "
                             f"{type(model).__name__} has {type(embedding).__name__} and {type(head).__name__}: "
                             f"use --quantize {method}")
    if embedding.embedding_dim % nf4.BLOCK:
        raise LoraforgeError(f"--quantize {method}-all: the hidden size {embedding.embedding_dim} is not a multiple of "
                             f"NF4's block of {nf4.BLOCK}, so embedding rows cannot be unpacked alone; use "
                             f"--quantize {method}")
    tied = head.weight is embedding.weight
    sizes = []
    packed = QuantEmbedding.from_embedding(embedding, method).to(embedding.weight.device).train(embedding.training)
    sizes.append((embedding.weight.numel() * embedding.weight.element_size(), packed.weight_bytes))
    model.set_input_embeddings(packed)
    if tied:  # the head reads the embedding's own bytes
        new_head = QuantLinear(method, packed.packed(), head.in_features, head.out_features, head.bias, packed.dtype)
    else:
        new_head = QuantLinear.from_linear(head, method).to(head.weight.device)
        sizes.append((head.weight.numel() * head.weight.element_size(), new_head.weight_bytes))
    model.set_output_embeddings(new_head.train(head.training))
    return sizes


def _own_memory(model: nn.Module) -> None:
    """Copy the model's remaining CPU tensors (embeddings, norms) out of the checkpoint file they may be mapped from.
    transformers maps safetensors files; as long as one tensor of a file lives, the whole mapping does, and every
    page the quantizer read (all the dense weights) stays resident: 0.5 GB for the default model, kept for nothing."""
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu":
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type == "cpu" and buffer.is_floating_point():
                    module._buffers[name] = buffer.clone()


def dequantize_model(model: nn.Module) -> int:
    """Every packed layer replaced by a dense one of its dequantized weight (in its compute dtype), in place: a model
    that `save_pretrained` writes as plain weights; a packed head that shared a packed embedding's bytes is tied to the
    dense embedding again. The number of layers replaced."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(embedding, QuantEmbedding) and isinstance(head, QuantLinear) and \
        embedding.qweight.data_ptr() == head.qweight.data_ptr()
    paths = [path for path, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    for path in paths:
        model.set_submodule(path, model.get_submodule(path).to_dense())
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return len(paths)


def _gguf_blocks(model: nn.Module, gguf_path: Path | None) -> dict[str, tuple[str, torch.Tensor]]:
    """{linear path: (format, block rows (out, bytes) in the model's row order)} for the file's legacy-quant weights."""
    import gguf  # noqa: PLC0415
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor  # noqa: PLC0415

    if gguf_path is None:
        raise LoraforgeError("--quantize gguf keeps a GGUF file's own blocks, and this model was not loaded from a "
                             ".gguf file; pass the .gguf file (or a built-in GGUF model), or use --quantize nf4")
    reader = gguf.GGUFReader(gguf_path)
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    n_layers = getattr(model.config, "num_hidden_layers", 0)
    if arch_id is None:
        raise LoraforgeError(f"{gguf_path}: architecture {arch!r} is unknown to the gguf package")
    names = gguf.get_tensor_name_map(arch_id, n_layers)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    tensors = {t.name: t for t in reader.tensors}
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for path in body_linears(model):
        gguf_name = names.get_name(path + ".weight", try_suffixes=(".weight",))
        tensor = tensors.get(gguf_name or "")
        fmt = tensor.tensor_type.name.lower() if tensor is not None else None
        if fmt not in ggml.FORMATS:
            continue
        rows = np.asarray(tensor.data)  # (out, bytes), a view of the mapped file
        order = processor.process(np.arange(rows.shape[0])[:, None], gguf_name).weights[:, 0]
        if sorted(order.tolist()) != list(range(rows.shape[0])):
            raise LoraforgeError(f"{gguf_path}: {gguf_name} is transformed on load in a way that is not a row "
                                 "permutation; --quantize gguf cannot keep its blocks (use --quantize nf4)")
        found[path] = (fmt, torch.from_numpy(np.ascontiguousarray(rows[order])))
    return found


def gguf_source(folder: Path) -> Path | None:
    """The GGUF file a converted model folder came from (`loraforge_source.json`), or None."""
    import json  # noqa: PLC0415

    source = Path(folder) / "loraforge_source.json"
    if not source.is_file():
        return None
    path = Path(json.loads(source.read_text())["gguf"])
    return path if path.is_file() else None
