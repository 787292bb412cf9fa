"""Inference state of HypeNet: `SequenceLayout` (where the tokens of one forward call sit) and `HypeNetCache`.

Padding never reaches a mixer. A forward call runs in one of three layouts:
- "dense":  hidden states [B, T, d], every token real, every row starts at position 0 (training, or a first
            prefill without padding);
- "packed": the real tokens only, [1, N, d], one sequence per batch row that has any, `cu_seqlens` [R + 1]
            (padded batches, and any prefill that continues a cache);
- "decode": [B, T, d] with T = 1, every row continues its own cached sequence (plain decoding).
Positions count real tokens only, so a left-padded row behaves exactly like the same prompt alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from hypenet.ops.checks import values_checkable

if TYPE_CHECKING:
    from hypenet.config import HypeNetConfig

# Attention caches grow to a multiple of this many tokens, and by at least a quarter, so decoding reallocates
# rarely; pass `max_length` to HypeNetCache to allocate once.
CAPACITY_ROUND = 256


class SequenceLayout:
    """Where the new tokens of one forward call sit (see the module docstring for the three modes).

    Attributes:
        mode: "dense" | "packed" | "decode".
        batch_size, seq_len: B and T of the padded input.
        position_ids: [1, T] ("dense"), [B, T] ("decode") or [1, N] ("packed"): positions counted in real
            tokens, continuing each row's cache.
        cu_seqlens: [R + 1] int32 offsets of the R packed sequences ("packed" only).
        rows: [R] int64 batch row of each packed sequence; seqlens: [R] int64 their new-token counts.
        token_index: [N] int64 flat index (b * T + t) of each packed token in the padded input.
    Set by `HypeNetCache.plan` for cached calls: kv_write_index, kv_read_index, cu_seqlens_k, cache_seqlens.
    """

    def __init__(self, mode: str, batch_size: int, seq_len: int, position_ids: Tensor, *,
                 cu_seqlens: Optional[Tensor] = None, rows: Optional[Tensor] = None,
                 seqlens: Optional[Tensor] = None, token_index: Optional[Tensor] = None):
        self.mode = mode
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.position_ids = position_ids
        self.cu_seqlens = cu_seqlens
        self.rows = rows
        self.seqlens = seqlens
        self.token_index = token_index
        self.token_rows: Optional[Tensor] = None  # (N,) batch row of each packed token
        self.token_offsets: Optional[Tensor] = None  # (N,) index of each packed token within its new tokens
        self.kv_write_index: Optional[Tensor] = None
        self.kv_read_index: Optional[Tensor] = None
        self.cu_seqlens_k: Optional[Tensor] = None
        self.cache_seqlens: Optional[Tensor] = None

    @classmethod
    def plan(cls, batch_size: int, seq_len: int, device: torch.device, attention_mask: Optional[Tensor] = None,
             past_lengths: Optional[Tensor] = None, has_past: bool = False) -> "SequenceLayout":
        """Choose the layout of T new tokens per row.

        attention_mask: [B, S] with S >= T, 1 for tokens and 0 for padding; its last T columns describe the new
            tokens (the earlier ones, if any, describe the cache and are not needed). None: every token is real.
        past_lengths: [B] int64 real tokens already cached per row (None without a cache).
        has_past: whether any token went through the cache before. Then T = 1 gives "decode", where every new
            token must be real.
        """
        B, T = batch_size, seq_len
        new_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be a 2D [B, S] padding mask with B = {B} and S >= {T} (the "
                                 f"new tokens), got shape {tuple(attention_mask.shape)}")
            new_mask = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
        steps = torch.arange(T, device=device)
        if has_past and T == 1:
            if new_mask is not None and values_checkable(new_mask) and not bool(new_mask.all()):
                raise ValueError("attention_mask marks a new token as padding while decoding one token per row; "
                                 "only the prompt may hold padding")
            return cls("decode", B, T, past_lengths[:, None] + steps)
        all_real = new_mask is None or bool(new_mask.all())
        if all_real and not has_past:
            return cls("dense", B, T, steps[None])

        if new_mask is None:
            new_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        counts = new_mask.sum(dim=1)  # (B,)
        rows_host = [b for b, n in enumerate(counts.tolist()) if n > 0]
        if not rows_host:
            raise ValueError(f"attention_mask marks all {T} new tokens of every row as padding")
        rows = torch.tensor(rows_host, dtype=torch.long, device=device)
        seqlens = counts[rows]  # (R,)
        cu_seqlens = torch.zeros(len(rows_host) + 1, dtype=torch.int32, device=device)
        cu_seqlens[1:] = seqlens.cumsum(0)
        token_index = new_mask.flatten().nonzero().squeeze(1)  # (N,), row by row
        N = token_index.numel()
        token_rows = token_index // T
        offsets = torch.arange(N, device=device) - cu_seqlens[:-1].long().repeat_interleave(seqlens, output_size=N)
        start = past_lengths[token_rows] if past_lengths is not None else 0
        layout = cls("packed", B, T, (start + offsets)[None], cu_seqlens=cu_seqlens, rows=rows, seqlens=seqlens,
                     token_index=token_index)
        layout.token_rows, layout.token_offsets = token_rows, offsets
        return layout

    @classmethod
    def from_padding(cls, attention_mask: Tensor, batch_size: int, seq_len: int) -> "SequenceLayout":
        """Layout of an uncached call on a padded batch: "dense" when nothing is padding, else "packed"."""
        return cls.plan(batch_size, seq_len, attention_mask.device, attention_mask)

    @property
    def packed(self) -> bool:
        return self.mode == "packed"

    def pack(self, x: Tensor) -> Tensor:
        """[B, T, ...] -> [1, N, ...] real tokens in "packed" mode; unchanged otherwise."""
        if not self.packed:
            return x
        return x.reshape(self.batch_size * self.seq_len, *x.shape[2:])[self.token_index][None]

    def unpack(self, x: Tensor) -> Tensor:
        """[1, N, ...] -> [B, T, ...] with zeros at padding in "packed" mode; unchanged otherwise."""
        if not self.packed:
            return x
        out = x.new_zeros(self.batch_size * self.seq_len, *x.shape[2:])
        return out.index_copy(0, self.token_index, x[0]).view(self.batch_size, self.seq_len, *x.shape[2:])


def run_unpadded(layer: torch.nn.Module, hidden_states: Tensor, position_ids: Optional[Tensor],
                 attention_mask: Tensor) -> Tensor:
    """Run a stand-alone mixer on the real tokens of a padded batch [B, T, d] only; padding outputs are zero.

    Positions default to the number of real tokens before each token, so left padding does not shift them.
    """
    B, T, _ = hidden_states.shape
    layout = SequenceLayout.from_padding(attention_mask, B, T)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = layer(layout.pack(hidden_states), layout.pack(position_ids.expand(B, T)), layout=layout)
    return layout.unpack(out)


class HypeNetCache(Cache):
    """Decode state of a HypeNet model: per Lightning layer an fp32 state [B, H, D, D], per attention layer K and
    V [B, capacity, Hkv, D] (k after k_norm, no RoPE) kept compact from index 0 in every row, and per row the count
    of real cached tokens `lengths` [B] (the `cache_seqlens` of `hype_attn_decode`).

    HypeNetCache(config, batch_size=None, max_length=None, *, dtype=None, device=None): with batch_size, dtype
    and device it allocates at once (max_length tokens of attention cache, e.g. for CUDA graphs); otherwise it
    allocates at the first forward and grows as needed. `generate()` creates one by itself.

    A forward call with this cache: `layout = cache.plan(...)`, the layers read and write through
    `lightning_state`, `lightning_initial_state`, `store_lightning_state` and `append_kv`, then
    `cache.finish(layout)` advances the lengths. `get_seq_length()` counts every column fed so far, padding
    included (what `generate()` expects); `lengths` counts real tokens per row.
    """

    def __init__(self, config: "HypeNetConfig", batch_size: Optional[int] = None,
                 max_length: Optional[int] = None, *, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None):
        super().__init__(layers=[])
        self.mixer_types = list(config.mixer_types)
        self.lightning_shape = (config.lightning_nh, config.lightning_head_dim, config.lightning_head_dim)
        self.kv_shape = (config.num_key_value_heads, config.head_dim)
        self.seen_tokens = 0
        self.capacity = 0
        self.lengths: Optional[Tensor] = None
        self.lightning_states: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self._batch_size: Optional[int] = None
        if batch_size is not None:
            if dtype is None or device is None:
                raise ValueError(f"allocating a HypeNetCache for batch_size={batch_size} needs dtype and device, "
                                 f"got dtype={dtype}, device={device}")
            self.allocate(batch_size, max_length or 0, dtype, torch.device(device))

    def __repr__(self) -> str:
        return (f"HypeNetCache(batch_size={self._batch_size}, seen_tokens={self.seen_tokens}, "
                f"capacity={self.capacity}, layers={len(self.mixer_types)})")

    def __len__(self) -> int:
        return len(self.mixer_types)

    def allocate(self, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        """Zero states and empty attention caches of `capacity` tokens for `batch_size` rows."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._batch_size = batch_size
        self.capacity = _round_capacity(capacity)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        for i, mixer in enumerate(self.mixer_types):
            if mixer == "lightning-attn":
                self.lightning_states[i] = torch.zeros(batch_size, *self.lightning_shape, dtype=torch.float32,
                                                       device=device)
            else:
                self.keys[i] = torch.empty(batch_size, self.capacity, *self.kv_shape, dtype=dtype, device=device)
                self.values[i] = torch.empty(batch_size, self.capacity, *self.kv_shape, dtype=dtype, device=device)

    def reserve(self, needed: int) -> None:
        """Grow every attention cache to hold at least `needed` tokens per row (copying what is cached)."""
        if needed <= self.capacity:
            return
        capacity = _round_capacity(max(needed, self.capacity + self.capacity // 4))
        for store in (self.keys, self.values):
            for i, old in store.items():
                new = old.new_empty(old.shape[0], capacity, *old.shape[2:])
                new[:, :self.capacity].copy_(old)
                store[i] = new
        self.capacity = capacity

    def plan(self, batch_size: int, seq_len: int, dtype: torch.dtype, device: torch.device,
             attention_mask: Optional[Tensor] = None) -> SequenceLayout:
        """Layout of the next forward call (see `SequenceLayout.plan`), with the cache slots it will write."""
        if self._batch_size is None:
            self.allocate(batch_size, 0, dtype, device)
        elif batch_size != self._batch_size:
            raise ValueError(f"the cache holds {self._batch_size} rows but the input has batch size {batch_size}")
        has_past = self.seen_tokens > 0
        layout = SequenceLayout.plan(batch_size, seq_len, device, attention_mask, self.lengths, has_past)
        if layout.mode == "dense":
            self.reserve(seq_len)
        elif layout.mode == "decode":
            # Every row holds at most seen_tokens tokens: a bound known without reading the device.
            self.reserve(self.seen_tokens + seq_len)
            starts = torch.arange(batch_size, device=device) * self.capacity + self.lengths  # (B,)
            layout.kv_write_index = (starts[:, None] + torch.arange(seq_len, device=device)).flatten()
            layout.cache_seqlens = self.lengths + seq_len
        else:
            past = self.lengths[layout.rows]  # (R,)
            totals = past + layout.seqlens  # (R,) keys of every sequence, cached + new
            self.reserve(int(totals.max()))
            token_rows = layout.token_rows
            layout.kv_write_index = token_rows * self.capacity + self.lengths[token_rows] + layout.token_offsets
            if bool((past > 0).any()):
                n_keys = int(totals.sum())
                layout.cu_seqlens_k = torch.zeros_like(layout.cu_seqlens)
                layout.cu_seqlens_k[1:] = totals.cumsum(0)
                key_offsets = (torch.arange(n_keys, device=device)
                               - layout.cu_seqlens_k[:-1].long().repeat_interleave(totals, output_size=n_keys))
                layout.kv_read_index = layout.rows.repeat_interleave(totals, output_size=n_keys) * self.capacity \
                    + key_offsets
            else:
                layout.cu_seqlens_k = layout.cu_seqlens
        return layout

    def lightning_state(self, layer_idx: int) -> Tensor:
        """The fp32 state [B, H, D, D] of a Lightning layer (decode updates it in place)."""
        return self.lightning_states[layer_idx]

    def lightning_initial_state(self, layer_idx: int, layout: SequenceLayout) -> Optional[Tensor]:
        """States [R, H, D, D] entering the packed sequences; None (zero) for a dense first prefill."""
        if layout.mode == "dense":
            return None
        return self.lightning_states[layer_idx].index_select(0, layout.rows)

    def store_lightning_state(self, layer_idx: int, final_state: Tensor, layout: SequenceLayout) -> None:
        """Keep the states after the call's tokens (in place, so the tensor a CUDA graph holds stays valid)."""
        state = self.lightning_states[layer_idx]
        if layout.mode == "dense":
            state.copy_(final_state)
        else:
            state.index_copy_(0, layout.rows, final_state.to(state.dtype))

    def append_kv(self, layer_idx: int, k: Tensor, v: Tensor,
                  layout: SequenceLayout) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Write the new keys/values of an attention layer and return what its attention reads.

        "decode": k, v [B, T, Hkv, D] -> (k_cache, v_cache [B, capacity, Hkv, D], cache_seqlens [B]).
        "dense":  k, v [B, T, Hkv, D] -> (k, v, None).
        "packed": k, v [1, N, Hkv, D] -> (keys, values [1, S, Hkv, D] packed per sequence, cached then new,
                  cu_seqlens_k [R + 1]).
        """
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        if layout.mode == "dense":
            k_cache[:, :k.shape[1]].copy_(k)
            v_cache[:, :v.shape[1]].copy_(v)
            return k, v, None
        flat_k = k_cache.view(-1, *self.kv_shape)
        flat_v = v_cache.view(-1, *self.kv_shape)
        flat_k.index_copy_(0, layout.kv_write_index, k.reshape(-1, *self.kv_shape))
        flat_v.index_copy_(0, layout.kv_write_index, v.reshape(-1, *self.kv_shape))
        if layout.mode == "decode":
            return k_cache, v_cache, layout.cache_seqlens
        if layout.kv_read_index is None:
            return k, v, layout.cu_seqlens_k
        keys = flat_k.index_select(0, layout.kv_read_index)[None]
        values = flat_v.index_select(0, layout.kv_read_index)[None]
        return keys, values, layout.cu_seqlens_k

    def finish(self, layout: SequenceLayout) -> None:
        """Count the tokens of the call that just ran (in place)."""
        if layout.packed:
            self.lengths.index_add_(0, layout.rows, layout.seqlens)
        else:
            self.lengths.add_(layout.seq_len)
        self.seen_tokens += layout.seq_len

    # The transformers `Cache` interface used by generate().
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def has_previous_state(self, layer_idx: Optional[int] = None, state_idx: Optional[int] = None) -> bool:
        return self.seen_tokens > 0

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        raise NotImplementedError("HypeNetCache is written by the HypeNet layers (plan / append_kv / finish), "
                                  "not through Cache.update")

    def reset(self) -> None:
        self.seen_tokens = 0
        if self.lengths is not None:
            self.lengths.zero_()
        for state in self.lightning_states.values():
            state.zero_()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row b takes the state of row beam_idx[b] (in place)."""
        for t in self._batch_tensors():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t.index_select(0, indices.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a Lightning state cannot be rolled back: HypeNetCache does not crop")

    @property
    def batch_size(self) -> Optional[int]:
        return self._batch_size

    @property
    def max_batch_size(self) -> Optional[int]:
        return self._batch_size

    @property
    def max_cache_len(self) -> int:
        return self.capacity

    @property
    def is_initialized(self) -> bool:
        return self._batch_size is not None

    @property
    def is_compileable(self) -> bool:
        # generate() would otherwise build 4D masks and static-cache graphs that this cache does not use.
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.mixer_types)

    @property
    def is_linear(self) -> list[bool]:
        return [mixer == "lightning-attn" for mixer in self.mixer_types]

    def _batch_tensors(self) -> list[Tensor]:
        if self._batch_size is None:
            return []
        return [self.lengths, *self.lightning_states.values(), *self.keys.values(), *self.values.values()]

    def _map_batch(self, fn) -> None:
        if self._batch_size is None:
            return
        self.lengths = fn(self.lengths)
        for store in (self.lightning_states, self.keys, self.values):
            for i in store:
                store[i] = fn(store[i])
        self._batch_size = self.lengths.shape[0]


def _round_capacity(tokens: int) -> int:
    return -(-tokens // CAPACITY_ROUND) * CAPACITY_ROUND
