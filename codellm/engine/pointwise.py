"""The gated activation and the rotary embedding as Triton kernels, for the GPU's steps outside a compile trace.

Between a packed prefill's GEMMs the pointwise work is memory-bound: what counts is the bytes each kernel moves.
Compiled by torch.compile for any shape (one compile for every graph bucket), these two index through flattened
dimensions and read the projections' strided views element by element: on the Llama-3-8B shape they took 4.5 ms
(SiLU gate) and 2.8 ms (rotary) of a 2048-token replay, where the bytes they move take about 1.7 and 0.4 ms at an
H100's bandwidth (benchmarks/NOTES.md, run 37). Here a program takes whole rows of contiguous features:
- ``silu_and_mul``: one row's gate and up halves of the fused gate/up projection, one pass, one output;
- ``rotary``: one token's heads (q or k, a strided view of the fused q/k/v projection) with its cos and sin read once,
  written in the [tokens, heads, D] order that FlashAttention and the KV cache's row writes read without a copy.

Both compute in fp32 and round once. Elsewhere (CPU, no Triton) callers keep their plain ops; ``TRITON_INTERPRET=1``
runs the kernels on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the kernels are GPU-only
    triton = None

log = logging.getLogger("codellm.engine")


def runs_on(device: torch.device) -> bool:
    """Whether Triton kernels run on ``device``: a GPU, or any device under Triton's interpreter."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def available(x: torch.Tensor) -> bool:
    return runs_on(x.device)


if triton is not None:
    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, width, x_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + width + cols, mask=mask).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    # the sizes that follow a prompt's length are not specialized on (divisible by 16, or 1): an eager prefill of a
    # new length would otherwise compile the kernel again while a stream waits
    @triton.jit(do_not_specialize=["tokens", "xb", "cb", "ob"])
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, tokens, xb, xh, xn, cb, cn, ob, oh, on,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b, n = pid // tokens, pid % tokens
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        keep = (h < heads)[:, None]
        trig = b * cb + n * cn
        c1 = tl.load(cos_ptr + trig + d).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + trig + HALF + d).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + trig + d).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + trig + HALF + d).to(tl.float32)[None, :]
        src = x_ptr + b * xb + n * xn + h[:, None] * xh + d[None, :]
        x1 = tl.load(src, mask=keep).to(tl.float32)
        x2 = tl.load(src + HALF, mask=keep).to(tl.float32)
        dst = out_ptr + b * ob + n * on + h[:, None] * oh + d[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(dst, (x1 * c1 - x2 * s1).to(ty), mask=keep)
        tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(ty), mask=keep)


def silu_and_mul(both: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``both`` = [..., gate | up] (last dimension contiguous): [..., width]."""
    width = both.shape[-1] // 2
    x = both.reshape(-1, both.shape[-1])
    out = torch.empty(x.shape[0], width, dtype=both.dtype, device=both.device)
    if x.shape[0]:
        block = min(1024, triton.next_power_of_2(width))
        _silu_and_mul_kernel[(x.shape[0], triton.cdiv(width, block))](x, out, width, x.stride(0), out.stride(0),
                                                                      BLOCK=block, num_warps=4)
    return out.view(*both.shape[:-1], width)


def rotary_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rotary`` takes these: [B, H, N, D] with D/2 a power of two, features contiguous, and cos, sin
    [B or 1, N, D] of the same D, laid out alike."""
    half = x.shape[-1] // 2
    return (x.dim() == 4 and cos.dim() == 3 and x.stride(-1) == 1 and cos.stride(-1) == 1 and half >= 8
            and half & (half - 1) == 0 and cos.shape[-1] == x.shape[-1] and cos.shape[1] == x.shape[2]
            and cos.shape[0] in (1, x.shape[0]) and sin.shape == cos.shape and sin.stride() == cos.stride())


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (the rotary embedding of Llama and its kin, with cos and sin repeating over
    the two halves of D as theirs do) for x [B, H, N, D]: shaped as x, laid out [B, N, H, D]."""
    b, heads, tokens, dim = x.shape
    out = torch.empty(b, tokens, heads, dim, dtype=x.dtype, device=x.device).transpose(1, 2)
    if b * tokens:
        block_h = min(32, triton.next_power_of_2(heads))
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        _rotary_kernel[(b * tokens, triton.cdiv(heads, block_h))](
            x, cos, sin, out, heads, tokens, x.stride(0), x.stride(1), x.stride(2), cb, cos.stride(1),
            out.stride(0), out.stride(1), out.stride(2), HALF=dim // 2, BLOCK_H=block_h, num_warps=4)
    return out


_CHECKED: dict = {}  # (family's function, device type) -> whether ``rotary`` gives what it gives


def rotary_matches(family, device: torch.device) -> bool:
    """Whether ``rotary`` computes what a model family's ``apply_rotary_pos_emb`` does, tried once per device type
    on a small input (a family with another formula keeps its own); never decided while a graph is captured."""
    key = (family, device.type)
    if key not in _CHECKED:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            q, k = (torch.randn(1, h, 5, 64, generator=gen).to(device) for h in (4, 2))
            angles = torch.randn(1, 5, 32, generator=gen).repeat(1, 1, 2).to(device)
            cos, sin = angles.cos(), angles.sin()
            want_q, want_k = family(q, k, cos, sin)
            _CHECKED[key] = bool(torch.allclose(rotary(q, cos, sin), want_q, atol=1e-4)
                                 and torch.allclose(rotary(k, cos, sin), want_k, atol=1e-4))
        except Exception:
            log.warning("the rotary kernel does not run on %s; the compiled form runs instead", device, exc_info=True)
            _CHECKED[key] = False
    return _CHECKED[key]
