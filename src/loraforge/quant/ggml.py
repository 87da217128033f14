"""GGML's legacy block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), dequantized in torch from a GGUF file's own bytes.

A row of a GGUF weight is a run of 32-weight blocks; each block is its scale d (fp16), for the `_1` types a minimum
m (fp16), for Q5 a 32-bit word of fifth bits, then the quants:

    Q4_0: w = d·(q − 8)      Q4_1: w = d·q + m      Q5_0: w = d·(q − 16)      Q5_1: w = d·q + m      Q8_0: w = d·q
    (4-bit q: the low nibbles of 16 bytes are weights 0–15, the high nibbles 16–31; Q5 adds bit j of the word as
    bit 4 of weight j; Q8_0's q is int8)

Computed in fp32 in the order `gguf.quants.dequantize` computes it (a product, then a separate sum), so the values
are that function's bit for bit (tested). A weight's blocks stay as the file has them: (rows, blocks · bytes).
"""
from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
QK = 32  # weights a block


def block_bytes(fmt: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[fmt.upper()]][1]


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, as fp32 (N, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) bytes -> (N, 32) fp32 values 0..15: the low nibbles first, then the high ones (unpacked as bytes,
    converted once)."""
    return torch.cat([qs & 15, qs >> 4], 1).float()


def _fifth_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bit j of each block's little-endian 32-bit word at `start`, times 16, as fp32 (N, 32)."""
    word = blocks[:, start:start + 4].contiguous().view(torch.int32)  # (N, 1)
    shifts = torch.arange(32, dtype=torch.int32, device=blocks.device)
    return ((word >> shifts) & 1).float() * 16


def dequantize(blocks: torch.Tensor, fmt: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """The (out, in) weight of `blocks` (uint8, (out, in / 32 · block bytes)) in format `fmt`, cast to `dtype`."""
    b = blocks.reshape(-1, block_bytes(fmt))  # (N, bytes): one row per block
    d = _f16(b, 0)
    if fmt == "q8_0":
        w = b[:, 2:].contiguous().view(torch.int8).float().mul_(d)
    elif fmt == "q4_0":
        w = _nibbles(b[:, 2:]).sub_(8).mul_(d)
    elif fmt == "q4_1":
        w = _nibbles(b[:, 4:]).mul_(d).add_(_f16(b, 2))
    elif fmt == "q5_0":
        w = _nibbles(b[:, 6:]).add_(_fifth_bits(b, 2)).sub_(16).mul_(d)
    elif fmt == "q5_1":
        w = _nibbles(b[:, 8:]).add_(_fifth_bits(b, 4)).mul_(d).add_(_f16(b, 2))
    else:
        raise ValueError(f"unknown GGML block format {fmt!r}; known: {', '.join(FORMATS)}")
    return w.view(shape).to(dtype)
