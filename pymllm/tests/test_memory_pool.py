"""KV slot allocators: capacity, reuse, and loud failure on double free."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pymllm.executor.device_memory import device_memory
from pymllm.mem_cache import KVAllocationError, KVPool, ReqToTokenPool, TokenToKVPoolAllocator


def test_allocator_hands_out_distinct_slots_and_takes_them_back():
    alloc = TokenToKVPoolAllocator(10)
    a = alloc.alloc(4)
    b = alloc.alloc(6)
    assert alloc.alloc(1) is None
    assert 0 not in a and 0 not in b, "slot 0 is reserved for padding"
    assert len(set(a.tolist()) | set(b.tolist())) == 10
    alloc.free(a)
    alloc.check_invariants()
    assert alloc.available_size() == 4
    alloc.free(b)
    assert alloc.available_size() == 10
    alloc.check_invariants()


def test_double_free_is_an_error():
    alloc = TokenToKVPoolAllocator(8)
    s = alloc.alloc(3)
    alloc.free(s)
    with pytest.raises(KVAllocationError):
        alloc.free(s[:1])
    with pytest.raises(KVAllocationError):
        alloc.free(np.array([0]))


def test_req_pool_and_kv_pool():
    pool = ReqToTokenPool(3, 16, "cpu")
    idx = [pool.alloc() for _ in range(3)]
    assert pool.alloc() is None and sorted(idx) == [0, 1, 2]
    pool.free(idx[0])
    with pytest.raises(KVAllocationError):
        pool.free(idx[0])
    assert pool.req_to_token.shape == (4, 16)  # padding row included
    kv = KVPool(8, num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    k = torch.randn(3, 2, 4)
    kv.set_kv(1, torch.tensor([1, 5, 7]), k, -k)
    assert torch.equal(kv.k_buffers[1][torch.tensor([1, 5, 7])], k)
    assert torch.equal(kv.v_buffers[1][5], -k[1])
    assert KVPool.bytes_per_token(2, 2, 4, torch.float16) == 2 * 2 * 2 * 4 * 2


class _FakeProps:
    is_integrated = True
    total_memory = 16 * 2**30


def test_integrated_gpu_uses_mem_available(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemFree: 100 kB\nMemAvailable: 8000000 kB\n")
    free, total = device_memory(torch.device("cuda", 0), properties=_FakeProps(), meminfo_path=str(meminfo))
    assert free == 8000000 * 1024
    assert total == 16 * 2**30


def test_cpu_memory_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2000 kB\nMemAvailable: 1000 kB\n")
    assert device_memory(torch.device("cpu"), meminfo_path=str(meminfo)) == (1000 * 1024, 2000 * 1024)
