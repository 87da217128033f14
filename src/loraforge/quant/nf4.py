"""NF4 (QLoRA's 4-bit NormalFloat), blockwise, with optional double quantization, in plain torch.

    w ≈ code[q] · absmax_b      q a 4-bit index, b = the block (`BLOCK` consecutive weights of the flattened
                                matrix, row-major; the last block may be shorter), absmax_b = max |w| in the block

Bytes, absmax and dequantized values are bitsandbytes' (0.50, `quantize_4bit(quant_type="nf4")`) bit for bit, checked
in the tests: two indices a byte, the first in the high nibble; a value is scaled by the block's `1 / absmax` (the
tail block is divided) and given the nearest code by bucketing at the midpoints between neighbouring codes.

Double quantization (Dettmers et al. 2023, section 3) stores the absmaxes themselves in 8 bits: their mean is
subtracted, and the rest quantized blockwise (`DQ_BLOCK` = 256) on bitsandbytes' signed dynamic 8-bit map:
0.5 + 1/64 + 4/(64·256) ≈ 0.516 bytes a weight instead of 0.5625.
"""
from __future__ import annotations

import functools

import torch

BLOCK = 64
DQ_BLOCK = 256

# The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (bitsandbytes' get_4bit_type("nf4")).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`, Dettmers 2015): 256 sorted float32 values,
    a sign, a run of zero bits that sets the exponent (powers of ten), and a linear fraction after it. Built once;
    never modify it."""
    data: list[float] = []
    for i in range(7):  # exponents 10^-6 .. 10^0
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of sorted `code` for each element (ties to the lower code, as bitsandbytes)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True)


def _blockwise_absmax_scale(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled values in [-1, 1], absmax per block) of a flat fp32 tensor, as bitsandbytes computes them."""
    n = flat.numel()
    full = n - n % block
    body = flat[:full].view(-1, block)  # (blocks, block)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if full < n:  # the tail block: divided, not multiplied by the reciprocal (bitsandbytes does so)
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def quantize(weight: torch.Tensor, double: bool = False) -> dict[str, torch.Tensor]:
    """Pack `weight` (any shape, float) as NF4: {"qweight": uint8 (ceil(n/2),), "absmax": float32 (blocks,)}, or with
    `double` {"qweight", "qabsmax": uint8 (blocks,), "absmax2": float32 (ceil(blocks/256),), "offset": float32 ()}."""
    flat = weight.detach().reshape(-1).float()
    scaled, absmax = _blockwise_absmax_scale(flat, BLOCK)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest(scaled, NF4_CODE).to(torch.uint8)
    packed = {"qweight": (q[0::2] << 4) | q[1::2]}
    if not double:
        return {**packed, "absmax": absmax}
    offset = absmax.mean()
    qabsmax, absmax2 = _quantize_8bit(absmax - offset)
    return {**packed, "qabsmax": qabsmax, "absmax2": absmax2, "offset": offset}


def _quantize_8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes on the dynamic map, absmax per `DQ_BLOCK`) of the centred absmaxes.

    With bitsandbytes installed its own kernel is used, so the bytes are its bytes. Without it, each value gets the
    nearest code; bitsandbytes' approximate CPU binary search picks the neighbour instead for ~0.2% of them, never
    more than 3e-5 farther on the [-1, 1] scale (tested)."""
    try:
        from bitsandbytes.functional import quantize_blockwise
    except ImportError:
        scaled, absmax2 = _blockwise_absmax_scale(values, DQ_BLOCK)
        return _nearest(scaled, dynamic_map()).to(torch.uint8), absmax2
    qabsmax, state = quantize_blockwise(values.contiguous(), blocksize=DQ_BLOCK)
    return qabsmax, state.absmax


def absmax_of(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 absmax per block, undoing double quantization when it was used."""
    if "absmax" in packed:
        return packed["absmax"]
    code = dynamic_map().to(packed["qabsmax"].device)
    values = code.index_select(0, packed["qabsmax"].int())
    return _scale_blocks(values, packed["absmax2"], DQ_BLOCK) + packed["offset"]


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """values (n,) · absmax of each one's block, in fp32."""
    n = values.numel()
    full = n - n % block
    out = (values[:full].view(-1, block) * absmax[:full // block, None]).reshape(-1)
    if full < n:
        out = torch.cat([out, values[full:] * absmax[-1]])
    return out


_PAIRS: dict[torch.device, torch.Tensor] = {}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unpack_kernel(device: torch.device):
    """The C++ NF4 unpacking (lora/csrc/quant.cpp, `nf4_unpack_`: one pass, into a given tensor; ~20x the pure-torch
    path on a CPU) where it is built, for a CPU tensor; else None. The kernels module is compiled once per machine
    (`lora.sgmv`); `LORAFORGE_KERNELS=0` turns it off."""
    if device.type != "cpu":
        return None
    from loraforge.lora import sgmv  # noqa: PLC0415  (the one compiled module of loraforge's kernels)

    return sgmv.kernel()


def dequantize(packed: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight back, `shape`, computed in fp32 (code · absmax, as bitsandbytes) and then cast to `dtype`; with
    `offset`, the `prod(shape)` weights that start at flat position `offset` (a multiple of `BLOCK`) of the packed
    matrix instead of its start; with `out` (contiguous, `shape`, `dtype`), written into it.

    On a CPU the C++ kernel computes it where it is built (`unpack_kernel`), the same values bit for bit (tested).
    Otherwise each byte is looked up in a 256 x 2 table of its two code values: one gather with int32 indices (5x
    faster than with int64 on this CPU), no unpacking pass."""
    if offset % BLOCK:
        raise ValueError(f"offset {offset} does not start an NF4 block of {BLOCK}")
    qweight = packed["qweight"]
    n = 1
    for size in shape:
        n *= size
    codes = qweight[offset // 2:(offset + n + 1) // 2]
    absmax = absmax_of(packed)[offset // BLOCK:(offset + n + BLOCK - 1) // BLOCK]
    kernel = unpack_kernel(qweight.device) if dtype in _KERNEL_DTYPES else None
    if kernel is not None:
        out = torch.empty(shape, dtype=dtype, device=qweight.device) if out is None else out
        kernel.nf4_unpack_(codes.contiguous(), absmax.float().contiguous(), NF4_CODE, out)
        return out
    pairs = _PAIRS.get(qweight.device)
    if pairs is None:
        byte = torch.arange(256)
        pairs = _PAIRS[qweight.device] = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], 1).to(qweight.device)
    values = pairs.index_select(0, codes.int()).view(-1)[:n]  # (n,) fp32 codes
    values = _scale_blocks(values, absmax, BLOCK).view(shape)
    return values.to(dtype) if out is None else out.copy_(values)
