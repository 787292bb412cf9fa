"""HyPE attention decode (one new query per row against a full KV cache): hypenet Triton split-KV kernels vs
PyTorch SDPA (cuDNN, flash), Hq=16, Hkv=8, D=128, alpha=500, bf16.

Bandwidth ("tbps") counts the K and V bytes of the cache each backend reads (2 * B * S * Hkv * D * 2 bytes with
native GQA); "pct_floor" compares with the measured device copy rate. Backends:
- "hypenet-triton": `triton_ops.hype_attention.decode.hype_attn_decode` on a contiguous [B, S, Hkv, D] cache with
  cache_seqlens = S; "hypenet-triton paged": the same tokens in a paged cache (256-token blocks, shuffled);
  "hypenet-triton op": `hypenet.ops.hype_attn_decode(backend="triton")` (validation and dispatch included);
- "sdpa-cudnn" (the anchor of the speedup column) and "sdpa-flash": one query, no mask, on a [B, Hkv, S, D]
  cache (their native layout), HyPE folded into the scale (free for a single query), GQA through enable_gqa
  (k, v expanded to Hq heads when refused: "gqa=repeat", with bandwidth counted on the bytes actually read).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from benches.common import add_rates, add_speedups, bench_ms, check_close
from hypenet.ops.reference.hype_attention import hype_attn_decode_ref, hype_logit_scale

HQ, HKV, D = 16, 8, 128
ALPHA = 500.0
DTYPE = torch.bfloat16
SHAPES = [(1, 131072), (8, 32768), (1, 524288)]
QUICK_SHAPES = [(1, 131072)]
PAGE = 256
OURS = "hypenet-triton"
ANCHOR = "sdpa-cudnn"


def _inputs(B: int, S: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(DTYPE)

    x = {"q": randn(B, 1, HQ, D), "k_cache": randn(B, S, HKV, D), "v_cache": randn(B, S, HKV, D),
         "seqlens": torch.full((B,), S, device="cuda", dtype=torch.int32)}
    x["q_bhtd"] = x["q"].transpose(1, 2).contiguous()
    return x


def _paged(x: dict) -> None:
    """Move the cache into shuffled PAGE-token blocks (frees the contiguous copy)."""
    B, S = x["k_cache"].shape[:2]
    n = S // PAGE
    order = torch.randperm(B * n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    x["block_table"] = order.reshape(B, n).to(torch.int32)
    for name in ("k", "v"):
        pages = torch.empty(B * n, PAGE, HKV, D, device="cuda", dtype=DTYPE)
        pages[order] = x[f"{name}_cache"].reshape(B * n, PAGE, HKV, D)
        x[f"{name}_pages"] = pages


def _ours(paged: bool) -> Callable:
    from triton_ops.hype_attention.decode import hype_attn_decode

    def run(x):
        if paged:
            return hype_attn_decode(x["q"], x["k_pages"], x["v_pages"], x["seqlens"], ALPHA, None, x["block_table"])
        return hype_attn_decode(x["q"], x["k_cache"], x["v_cache"], x["seqlens"], ALPHA, None, None)
    return run


def _ours_op() -> Callable:
    import hypenet.ops

    def run(x):
        return hypenet.ops.hype_attn_decode(x["q"], x["k_cache"], x["v_cache"], x["seqlens"], alpha=ALPHA,
                                            backend="triton")
    return run


def _sdpa(backend, gqa: str) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def run(x):
        S = x["k_bhtd"].shape[2]
        scale = D ** -0.5 * float(hype_logit_scale(torch.tensor(S - 1), ALPHA))
        k, v = (x["k_bhtd"], x["v_bhtd"]) if gqa == "native" else (x["k_rep"], x["v_rep"])
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(x["q_bhtd"], k, v, scale=scale, enable_gqa=gqa == "native")
    return run


def _try(name: str, fn: Callable, x: dict, skipped: dict) -> bool:
    try:
        fn(x)
        torch.cuda.synchronize()
        return True
    except Exception as err:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        return False


def _check() -> None:
    """Contiguous and paged decode against the fp64 reference, ragged cache lengths, 3 new tokens per row."""
    from triton_ops.hype_attention.decode import hype_attn_decode
    g = torch.Generator(device="cuda").manual_seed(11)
    B, TQ, S_MAX = 3, 3, 4096
    q = torch.randn(B, TQ, HQ, D, generator=g, device="cuda").to(DTYPE)
    k = torch.randn(B, S_MAX, HKV, D, generator=g, device="cuda").to(DTYPE)
    v = torch.randn(B, S_MAX, HKV, D, generator=g, device="cuda").to(DTYPE)
    seqlens = torch.tensor([4096, 3, 1999], device="cuda", dtype=torch.int32)
    ref = hype_attn_decode_ref(q.double(), k.double(), v.double(), seqlens, ALPHA)
    check_close(f"{OURS} decode", hype_attn_decode(q, k, v, seqlens, ALPHA, None, None), ref, 1e-2)
    n = S_MAX // PAGE
    order = torch.randperm(B * n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    k_pages = torch.empty_like(k).reshape(B * n, PAGE, HKV, D)
    v_pages = torch.empty_like(v).reshape(B * n, PAGE, HKV, D)
    k_pages[order], v_pages[order] = k.reshape(B * n, PAGE, HKV, D), v.reshape(B * n, PAGE, HKV, D)
    paged = hype_attn_decode(q, k_pages, v_pages, seqlens, ALPHA, None, order.reshape(B, n).to(torch.int32))
    check_close(f"{OURS} paged decode", paged, ref, 1e-2)
    print("# checked hypenet-triton decode (contiguous and paged) against the fp64 reference", flush=True)


def run(quick: bool) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("the hype_attn_decode benchmark needs a GPU")
    from torch.nn.attention import SDPBackend
    _check()
    rows = []
    for B, S in QUICK_SHAPES if quick else SHAPES:
        x = _inputs(B, S, seed=B + S)
        shape = f"B{B} S{S} Hq{HQ} Hkv{HKV} D{D} bf16"
        kv_bytes = 2 * B * S * HKV * D * DTYPE.itemsize
        backends = {OURS: (_ours(False), kv_bytes), "hypenet-triton op": (_ours_op(), kv_bytes)}
        skipped = {}
        x["k_bhtd"] = x["k_cache"].transpose(1, 2).contiguous()
        x["v_bhtd"] = x["v_cache"].transpose(1, 2).contiguous()
        for label, backend in ((ANCHOR, SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            fn = _sdpa(backend, "native")
            if _try(label, fn, x, skipped):
                backends[label] = (fn, kv_bytes)
                continue
            if "k_rep" not in x:
                x["k_rep"] = x["k_bhtd"].repeat_interleave(HQ // HKV, dim=1)
                x["v_rep"] = x["v_bhtd"].repeat_interleave(HQ // HKV, dim=1)
            fn = _sdpa(backend, "repeat")
            if _try(f"{label} gqa=repeat", fn, x, skipped):
                backends[label] = (fn, kv_bytes * HQ // HKV)
        for name, reason in skipped.items():
            print(f"# {shape}: skipped {name}: {reason}", flush=True)
        for name, (fn, nbytes) in backends.items():
            row = {"op": "hype_attn_decode", "shape": shape, "backend": name, "pass": "decode"}
            row["ms"] = bench_ms(lambda fn=fn, x=x: fn(x))
            rows.append(add_rates(row, nbytes=nbytes))
            print(f"# {shape} {name}: {row['ms'] * 1e3:.1f} us {row['tbps']:.2f} TB/s", flush=True)
        for name in ("k_bhtd", "v_bhtd", "k_rep", "v_rep"):
            x.pop(name, None)
        _paged(x)
        for name in ("k_cache", "v_cache"):
            x.pop(name)
        row = {"op": "hype_attn_decode", "shape": shape, "backend": f"{OURS} paged", "pass": "decode"}
        row["ms"] = bench_ms(lambda fn=_ours(True), x=x: fn(x))
        rows.append(add_rates(row, nbytes=kv_bytes))
        print(f"# {shape} {OURS} paged: {row['ms'] * 1e3:.1f} us {row['tbps']:.2f} TB/s", flush=True)
        del x
        torch.cuda.empty_cache()
    add_speedups(rows, ANCHOR)
    return rows
