"""Baseline quantizers: `int8` (CacheGen's 8-bit baseline) and `kivi2` / `kivi4` (KIVI), as pure
function pairs behind thin codecs.

- int8: symmetric, one scale per (layer, K/V, token) over all channels, 256 bins ([-127, 127]).
- kivi: asymmetric (min and step); keys grouped per channel over `GROUP` consecutive tokens, values per
  token over `GROUP` consecutive channels; 2 or 4 bits per element, packed little-end first.
Scales are float16; every size figure counts them. Payload: scales, then the packed integers; its exact
length follows from the shape, so any other length is a `CodecError`.
"""

from __future__ import annotations

import numpy as np
import torch

from codec.base import Codec, CodecError, register

GROUP = 32  # KIVI's group size along the grouped axis


def int8_quantize(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv [L, 2, T, H, D] -> (q [L, 2, T, H * D] int8, scale [L, 2, T, 1] float16)."""
    x = kv.reshape(*kv.shape[:3], -1).float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).to(torch.float16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float16)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    out.view(*q.shape).copy_(q.float() * scale.float())


def _groups(x: torch.Tensor, axis_len: int) -> tuple[torch.Tensor, int]:
    """Pad the last axis to a multiple of GROUP (edge values) and split it: [..., n] -> [..., g, GROUP]."""
    pad = (-axis_len) % GROUP
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, GROUP), pad


def kivi_quantize(kv: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kv [L, 2, T, H, D] -> (q uint8 [L, 2, ...groups, GROUP] in [0, 2**bits), lo, step float16).

    Keys: [L, C, T] grouped over tokens (per channel); values: [L, T, C] grouped over channels (per token).
    """
    L, _, T, H, D = kv.shape
    x = kv.reshape(L, 2, T, H * D).float()
    keys, _ = _groups(x[:, 0].transpose(1, 2), T)  # [L, C, gT, GROUP]
    vals, _ = _groups(x[:, 1], H * D)  # [L, T, gC, GROUP]
    qs, los, steps = [], [], []
    for g in (keys, vals):
        lo = g.amin(dim=-1, keepdim=True).to(torch.float16).float()
        step = ((g.amax(dim=-1, keepdim=True) - lo) / (2**bits - 1)).to(torch.float16).float()
        safe = torch.where(step > 0, step, torch.ones_like(step))
        qs.append(torch.round((g - lo) / safe).clamp_(0, 2**bits - 1).to(torch.uint8).reshape(-1))
        los.append(lo.to(torch.float16).reshape(-1))
        steps.append(step.to(torch.float16).reshape(-1))
    return torch.cat(qs), torch.cat(los), torch.cat(steps)


def kivi_dequantize(q: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    L, _, T, H, D = out.shape
    C = H * D
    gt, gc = -(-T // GROUP), -(-C // GROUP)
    nk = L * C * gt * GROUP
    kq, vq = q[:nk].reshape(L, C, gt, GROUP), q[nk:].reshape(L, T, gc, GROUP)
    nks = L * C * gt
    keys = kq.float() * step[:nks].float().reshape(L, C, gt, 1) + lo[:nks].float().reshape(L, C, gt, 1)
    vals = vq.float() * step[nks:].float().reshape(L, T, gc, 1) + lo[nks:].float().reshape(L, T, gc, 1)
    o = out.view(L, 2, T, C)
    o[:, 0].copy_(keys.reshape(L, C, -1)[:, :, :T].transpose(1, 2))
    o[:, 1].copy_(vals.reshape(L, T, -1)[:, :, :C])


def _pack(q: torch.Tensor, bits: int) -> np.ndarray:
    per = 8 // bits
    a = q.numpy()
    a = np.concatenate([a, np.zeros((-a.size) % per, dtype=np.uint8)]).reshape(-1, per)
    packed = np.zeros(a.shape[0], dtype=np.uint8)
    for i in range(per):
        packed |= a[:, i] << (i * bits)
    return packed


def _unpack(packed: np.ndarray, n: int, bits: int) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    a = np.empty((packed.size, per), dtype=np.uint8)
    for i in range(per):
        a[:, i] = (packed >> (i * bits)) & mask
    return torch.from_numpy(a.reshape(-1)[:n].copy())


def _check_out(out: torch.Tensor) -> None:
    if out.dim() != 5 or out.shape[1] != 2 or not out.is_contiguous() or not out.is_floating_point():
        raise CodecError(f"decoding needs a contiguous float [L, 2, T, H, D] output, got {out.dtype} {tuple(out.shape)}")


@register
class Int8Codec(Codec):
    name = "int8"
    lossless = False

    def nominal_bits(self, element_bits: int) -> float:
        return 8.1  # a float16 scale per token row

    def encode(self, kv: torch.Tensor) -> bytes:
        q, scale = int8_quantize(kv)
        return scale.numpy().tobytes() + q.numpy().tobytes()

    def decode(self, payload: memoryview, out: torch.Tensor) -> None:
        _check_out(out)
        L, _, T, H, D = out.shape
        ns = L * 2 * T
        if len(payload) != 2 * ns + ns * H * D:
            raise CodecError(f"int8 payload has {len(payload)} bytes, expected {2 * ns + ns * H * D}")
        buf = np.frombuffer(payload, dtype=np.uint8)
        scale = torch.from_numpy(buf[: 2 * ns].view(np.float16).copy()).reshape(L, 2, T, 1)
        q = torch.from_numpy(buf[2 * ns :].view(np.int8).copy()).reshape(L, 2, T, H * D)
        int8_dequantize(q, scale, out)


class _KiviCodec(Codec):
    lossless = False
    bits: int

    def nominal_bits(self, element_bits: int) -> float:
        return self.bits + 1.0  # a float16 offset and step per group of 32, keys and values both ways

    def encode(self, kv: torch.Tensor) -> bytes:
        q, lo, step = kivi_quantize(kv, self.bits)
        return lo.numpy().tobytes() + step.numpy().tobytes() + _pack(q, self.bits).tobytes()

    def decode(self, payload: memoryview, out: torch.Tensor) -> None:
        _check_out(out)
        L, _, T, H, D = out.shape
        C = H * D
        gt, gc = -(-T // GROUP), -(-C // GROUP)
        ns = L * (C * gt + T * gc)
        nq = ns * GROUP
        nbytes = -(-nq * self.bits // 8)
        if len(payload) != 4 * ns + nbytes:
            raise CodecError(f"{self.name} payload has {len(payload)} bytes, expected {4 * ns + nbytes}")
        buf = np.frombuffer(payload, dtype=np.uint8)
        lo = torch.from_numpy(buf[: 2 * ns].view(np.float16).copy())
        step = torch.from_numpy(buf[2 * ns : 4 * ns].view(np.float16).copy())
        q = _unpack(buf[4 * ns :], nq, self.bits)
        kivi_dequantize(q, lo, step, out, self.bits)


@register
class Kivi2Codec(_KiviCodec):
    name = "kivi2"
    bits = 2


@register
class Kivi4Codec(_KiviCodec):
    name = "kivi4"
    bits = 4
