"""Staged blocks (staging.py): a block's tensors as views of one host buffer, loaded by one copy into
a window slot. On the CPU the "device" is the CPU too: these tests check what is held where and that
outputs do not change; the overlap is the GPU's (tests/test_gpu.py)."""
import gc
import weakref

import torch
from torch import nn

from tierquant import components as C
from tierquant.backends import quantize
from tierquant.pinned import ALIGN
from tierquant.staging import Staged, Window
from tierquant import streaming
from tierquant.streaming import BlockStreamer
from tierquant.tensors import describe, leaves

from test_streaming import flux_transformer, transformer_call


def _leaves_of(module):
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        leaves(t, describe(t), out)
    return out


def _inside(t, buf):
    start = buf.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + buf.numel()


def int8_flux_and_its_output(layers: int, single_layers: int):
    tr = flux_transformer(layers, single_layers)
    quantize(tr, "int8-weight")
    kw = transformer_call()
    with torch.no_grad():
        return tr, kw, tr(**kw).sample


def test_a_staged_block_holds_views_of_one_buffer_and_gives_the_same_output():
    tr, kw, ref = int8_flux_and_its_output(2, 2)
    window = Window(torch.device("cpu"), slots=2)
    blocks = [b for _, b in C.stream_blocks(tr)]
    assert all(Staged.refuses(b) is None for b in blocks)
    types = [[type(t) for t in b.parameters()] for b in blocks]
    staged = [Staged(b, window) for b in blocks]
    for st, before in zip(staged, types):
        assert [type(t) for t in st.module.parameters()] == before  # torchao's tensors stay torchao's
        assert all(_inside(leaf, st.host_buffer) for leaf in _leaves_of(st.module))
        # each tensor starts at a multiple of ALIGN from the buffer's start (a CUDA buffer's start is
        # aligned by the caching allocator)
        assert all((leaf.data_ptr() - st.host_buffer.data_ptr()) % ALIGN == 0 for leaf in _leaves_of(st.module))
    assert window.nbytes == max(st.nbytes for st in staged)
    with torch.no_grad():
        assert torch.equal(tr(**kw).sample, ref)  # from the host views
    for i, st in enumerate(staged):
        st.onload(i % 2)
        assert all(_inside(leaf, window.buffer(i % 2)) for leaf in _leaves_of(st.module))
        st.offload()
    # In order, each block's tensors are made once per slot and found again at its next load.
    made = [st.made[i % 2] for i, st in enumerate(staged)]
    for i, st in enumerate(staged):
        st.onload(i % 2)
        assert all(a is b for a, b in zip(made[i], st.made[i % 2]))
    # the tensors are the slot's while computing: the same output, slot by slot
    hooks = [st.module.register_forward_pre_hook(lambda m, a, st=st, k=i % 2: st.onload(k)) for i, st in
             enumerate(staged)] + [st.module.register_forward_hook(lambda m, a, o, st=st: st.offload())
                                   for st in staged]
    for st in staged:
        st.offload()
    with torch.no_grad():
        assert torch.equal(tr(**kw).sample, ref)
    for h in hooks:
        h.remove()


def test_tied_tensors_stay_tied_and_the_window_gives_its_memory_back():
    shared = nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16), requires_grad=False)
    block = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    block[0].weight = block[1].weight = shared
    window = Window(torch.device("cpu"), slots=2)
    st = Staged(block, window)
    assert block[0].weight is block[1].weight and isinstance(block[0].weight, nn.Parameter)
    assert torch.equal(block[0].weight, shared)
    st.onload(0)
    assert block[0].weight is block[1].weight and _inside(block[0].weight, window.buffer(0))
    slot = weakref.ref(window.buffer(0))
    st.offload()
    window.free()
    gc.collect()
    assert slot() is None and not st.made  # nothing keeps a slot's memory once the window is freed
    st.onload(None)  # memory of its own, outside the window
    assert window.buffers is None and torch.equal(block[1].weight, shared)


def test_nf4_and_gappy_blocks_are_refused_and_streamed_tensor_by_tensor(monkeypatch):
    block = nn.Sequential(nn.Linear(64, 64))
    block[0].weight = nn.Parameter(torch.randn(64, 64).t(), requires_grad=False)  # a transposed view
    assert Staged.refuses(block) is None  # dense in another order: staged with its strides
    block[0].weight = nn.Parameter(torch.randn(64, 128)[:, ::2], requires_grad=False)  # every other column
    assert "gaps" in Staged.refuses(block)
    # a transposed weight staged and loaded into a slot keeps its values and strides
    dense = nn.Linear(64, 32)
    dense.weight = nn.Parameter(dense.weight.detach().t().contiguous().t(), requires_grad=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = dense(x)
        st = Staged(dense, Window(torch.device("cpu"), slots=1))
        st.onload(0)
        assert dense.weight.stride() == (1, 32) and torch.equal(dense(x), ref)
        st.offload()
    tr = flux_transformer(2, 3)
    quantize(tr, "nf4")
    assert "bitsandbytes" in Staged.refuses(C.stream_blocks(tr)[0][1])
    monkeypatch.setattr(streaming, "STAGE", True)
    streamer = BlockStreamer(tr, torch.device("cpu"), resident_blocks=2, prefetch=1)
    assert streamer.window is None and not any(isinstance(sw, Staged) for sw in streamer.streamed)
    streamer.remove()
    # and every block moves tensor by tensor when staging is off
    monkeypatch.setattr(streaming, "STAGE", False)
    tr8, _, _ = int8_flux_and_its_output(2, 3)
    streamer = BlockStreamer(tr8, torch.device("cpu"), resident_blocks=2, prefetch=1)
    assert streamer.window is None and not any(isinstance(sw, Staged) for sw in streamer.streamed)
    streamer.remove()


def test_the_streamer_stages_its_blocks_and_a_block_called_out_of_order_gets_memory_of_its_own(monkeypatch):
    monkeypatch.setattr(streaming, "STAGE", True)
    tr, kw, ref = int8_flux_and_its_output(2, 3)
    streamer = BlockStreamer(tr, torch.device("cpu"), resident_blocks=1, prefetch=1)
    assert streamer.window is not None and all(isinstance(sw, Staged) for sw in streamer.streamed)
    with torch.no_grad():
        assert torch.equal(tr(**kw).sample, ref)
        assert streamer.on == 0 and streamer.most_on <= 2
        assert torch.equal(tr(**kw).sample, ref)
    assert streamer.on == 1  # from the second call on, the next call's first block is sent at the end
    streamer.release()
    # Block 2 (slot 0) called while block 0 (slot 0 too) is on: block 2 may not overwrite it.
    first, third = streamer.streamed[0], streamer.streamed[2]
    streamer._load(0)
    w0 = [t.clone() for t in _leaves_of(first.module)]
    streamer._load(2)
    assert first.slot == 0 and third.slot is None
    assert all(torch.equal(a, b) for a, b in zip(w0, _leaves_of(first.module)))  # block 0 intact
    streamer.release()
    assert streamer.window.buffers is None and not first.on_device and not third.on_device
    streamer.remove()
