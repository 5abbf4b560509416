"""Host memory page-locked at its exact size (pinned.py). The CUDA runtime is faked on the CPU: these
tests check what is registered, for how long, and what happens when CUDA refuses; tests/test_gpu.py
checks the real thing."""
import gc

import pytest
import torch

from tierquant import pinned
from tierquant.backends import quantize
from tierquant.placement import Swapped
from tierquant.staging import Staged, Window


class FakeCudart:
    """What `torch.cuda.cudart()` gives: cudaHostRegister / cudaHostUnregister returning an error code."""

    class cudaError:
        success = 0

    def __init__(self, refuse: bool = False):
        self.refuse, self.locked, self.calls = refuse, {}, []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size))
        if self.refuse:
            return 2  # cudaErrorMemoryAllocation
        self.locked[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0 if self.locked.pop(ptr, None) is not None else 1


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_a_buffer_is_locked_at_its_exact_size_until_the_last_tensor_over_it_goes(cudart):
    before = pinned.registered_bytes()
    nbytes = 326 * 2**20 + 123  # torch's pinned allocator would lock 512 MiB for this
    buf, locked = pinned.empty(nbytes)
    assert locked and buf.numel() == nbytes and buf.dtype == torch.uint8
    assert list(cudart.locked.items()) == [(buf.data_ptr(), nbytes)]
    assert buf.data_ptr() % pinned.PAGE == 0
    assert pinned.registered_bytes() == before + nbytes
    view = buf[4096:8192].view(torch.float32)  # a view keeps the memory, and so its lock
    del buf
    gc.collect()
    assert cudart.locked and pinned.registered_bytes() == before + nbytes
    view.fill_(1.0)
    del view
    gc.collect()
    assert cudart.locked == {} and pinned.registered_bytes() == before


def test_where_cuda_refuses_to_lock_torchs_pinned_allocator_or_pageable_memory_serves(cudart, monkeypatch):
    cudart.refuse = True
    asked = []

    def empty(*args, pin_memory=False, **kw):
        asked.append(pin_memory)
        if pin_memory:
            raise RuntimeError("no pinned memory on this machine")
        return torch.zeros(*args, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    buf, locked = pinned.empty(1000)
    assert not locked and buf.numel() == 1000 and asked == [True, False]
    assert cudart.locked == {}


def test_a_copy_keeps_a_quantized_tensors_type_and_values_in_one_locked_buffer(cudart):
    block = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=True))
    quantize(block, "int8-weight")
    w = block[0].weight
    assert type(w) not in (torch.Tensor, torch.nn.Parameter)  # torchao's
    x = torch.randn(3, 256)
    ref = torch.nn.functional.linear(x, w)
    host, locked = pinned.copy(w)
    assert locked and type(host) is type(w)
    assert torch.equal(torch.nn.functional.linear(x, host), ref)
    [(ptr, size)] = cudart.locked.items()
    inner = [getattr(host, n) for n in host.__tensor_flatten__()[0]]
    assert all(ptr <= t.data_ptr() < ptr + size for t in inner)


def test_a_transposed_tensor_is_copied_as_it_is_laid_out_and_a_slice_falls_back(cudart):
    """A tensor that fills its memory in another order of its dimensions (a transposed weight) keeps its
    strides in an exactly locked copy; one with gaps (a slice) cannot be laid out so: `pin` falls back,
    and says which tensor and why (`pinned.fallbacks`, reported by the benchmark beside its locked bytes)."""
    w = torch.randn(48, 80).t()
    assert not w.is_contiguous() and pinned.dense(w)
    host, locked = pinned.copy(w)
    assert locked and host.stride() == w.stride() and torch.equal(host, w)
    assert [size for _, size in cudart.locked.items()] == [48 * 80 * 4]

    gappy = torch.randn(64, 80)[:, :40]
    assert not pinned.dense(gappy) and not pinned.dense(torch.randn(4, 1).expand(4, 8))
    with pytest.raises(ValueError, match="gaps"):
        pinned.copy(gappy)
    seen = len(pinned.fallbacks())
    host, locked = pinned.pin(gappy)  # torch's allocator, which this CPU build refuses: pageable
    assert torch.equal(host, gappy)
    assert pinned.fallbacks()[seen:] == [{"shape": [64, 40], "dtype": "torch.float32", "bytes": 64 * 40 * 4,
                                          "why": "not copied into exact page-locked memory: a tensor has gaps "
                                                 "or overlaps in memory (a slice, or an expanded view)"}]


def test_swapped_and_staged_blocks_hold_exactly_locked_host_copies(cudart):
    blocks = [torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
              for _ in range(2)]
    quantize(blocks[1], "int8-weight")
    assert type(blocks[1][0].weight) not in (torch.Tensor, torch.nn.Parameter)
    x = torch.randn(2, 128)
    with torch.no_grad():
        refs = [b(x) for b in blocks]
    swapped = Swapped(blocks[0], torch.device("cpu"))
    staged = Staged(blocks[1], Window(torch.device("cpu"), 2))
    assert swapped.unpinned_bytes == 0 and staged.unpinned_bytes == 0
    # one registration per swapped tensor (4) and one per staged block, each exactly its bytes
    sizes = sorted(cudart.locked.values())
    assert len(sizes) == 5 and staged.nbytes in sizes
    assert sum(sizes) - staged.nbytes == sum(-(-t.numel() * t.element_size() // pinned.ALIGN) * pinned.ALIGN
                                             for t in blocks[0].parameters())
    with torch.no_grad():
        assert torch.equal(blocks[0](x), refs[0]) and torch.equal(blocks[1](x), refs[1])
