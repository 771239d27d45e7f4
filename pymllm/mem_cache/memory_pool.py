"""KV memory: request slots (ReqToTokenPool), token slots (TokenToKVPoolAllocator), KV buffers.

The allocator works on host-side numpy arrays so the scheduler stays free of tensors; only the
KV buffers and the req_to_token table live on the model's device.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)


class KVAllocationError(RuntimeError):
    """A programming error in slot bookkeeping (double free, foreign slot)."""


class ReqToTokenPool:
    """Maps (request slot, token position) -> KV slot: the page table, page size 1."""

    def __init__(self, size: int, max_context_len: int, device: torch.device | str):
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        # One extra row: CUDA-graph padding sequences point at row `size`, which stays all-zero.
        self.req_to_token = torch.zeros((size + 1, max_context_len), dtype=torch.int32, device=self.device)
        self._free: List[int] = list(range(size - 1, -1, -1))

    @property
    def padding_row(self) -> int:
        return self.size

    def available_size(self) -> int:
        return len(self._free)

    def alloc(self) -> Optional[int]:
        return self._free.pop() if self._free else None

    def free(self, index: int) -> None:
        if not 0 <= index < self.size or index in self._free:
            raise KVAllocationError(f"request slot {index} freed twice or never allocated")
        self._free.append(index)

    def clear(self) -> None:
        self._free = list(range(self.size - 1, -1, -1))


class TokenToKVPoolAllocator:
    """A stack of free KV slots. Slot 0 is never handed out: padded batches write into it."""

    def __init__(self, size: int):
        self.size = size
        self._stack = np.arange(size, 0, -1, dtype=np.int64)  # slots 1..size
        self._top = size
        self._in_use = np.zeros(size + 1, dtype=bool)

    def available_size(self) -> int:
        return self._top

    def used_size(self) -> int:
        return self.size - self._top

    def alloc(self, n: int) -> Optional[np.ndarray]:
        if n > self._top:
            return None
        slots = self._stack[self._top - n : self._top].copy()
        self._top -= n
        self._in_use[slots] = True
        return slots

    def free(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return
        if slots.min() < 1 or slots.max() > self.size or not self._in_use[slots].all():
            raise KVAllocationError("KV slot freed twice or never allocated")
        if np.unique(slots).size != slots.size:
            raise KVAllocationError("KV slot freed twice in one call")
        self._in_use[slots] = False
        self._stack[self._top : self._top + slots.size] = slots
        self._top += slots.size

    def clear(self) -> None:
        self._stack = np.arange(self.size, 0, -1, dtype=np.int64)
        self._top = self.size
        self._in_use[:] = False

    def check_invariants(self) -> None:
        """Every slot is either free (exactly once) or in use."""
        free = self._stack[: self._top]
        if np.unique(free).size != free.size:
            raise KVAllocationError("a KV slot appears twice in the free list")
        if self._in_use[free].any():
            raise KVAllocationError("a free KV slot is marked in use")
        if int(self._in_use.sum()) + self._top != self.size:
            raise KVAllocationError("KV slots leaked: in-use + free != capacity")


class KVPool:
    """Per-layer K and V buffers of shape [size + 1, num_kv_heads, head_dim]; row 0 is padding."""

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        v_head_dim: Optional[int] = None,
    ):
        self.size = size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.k_buffers = [
            torch.zeros((size + 1, num_kv_heads, head_dim), dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]
        self.v_buffers = [
            torch.zeros((size + 1, num_kv_heads, self.v_head_dim), dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, num_kv_heads, head_dim] written at slots `loc`."""
        self.k_buffers[layer_id][loc] = k.to(self.dtype)
        self.v_buffers[layer_id][loc] = v.to(self.dtype)
