"""Block streaming: part of a component resident, the rest streamed block by block, tensors whole.
On the CPU there is no side stream, so these tests check the mechanics (what moves when, what the
outputs are); the overlap itself is for the GPU test and the benchmark."""
import numpy as np
import pytest
import torch

from tierquant import components as C
from tierquant.applier import apply_checked
from tierquant.backends import quantize
from tierquant.checks import fingerprint
from tierquant.hardware import detect
from tierquant.plan import Choice, Plan
from tierquant.streaming import BlockStreamer


def transformer_call() -> dict:
    """One call of a tiny Flux transformer (16 image tokens, 8 text tokens, width 64)."""
    return dict(hidden_states=torch.randn(1, 16, 64, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, 8, 64, dtype=torch.bfloat16),
                pooled_projections=torch.randn(1, 64, dtype=torch.bfloat16), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))


def flux_transformer(layers: int, single_layers: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                  pooled_projection_dim=64, guidance_embeds=True,
                                  axes_dims_rope=[4, 6, 6]).to(torch.bfloat16).eval()


def test_streamed_blocks_give_the_resident_output_and_leave_after_use(tiny_flux_pipe):
    tr = tiny_flux_pipe.transformer.to(torch.bfloat16)
    quantize(tr, "int8-weight")
    torch.manual_seed(0)
    kw = transformer_call()
    with torch.no_grad():
        ref = tr(**kw).sample
    n = len(C.stream_blocks(tr))
    streamer = BlockStreamer(tr, torch.device("cpu"), resident_blocks=1, prefetch=1)
    assert len(streamer.streamed) == n - 1 and n >= 3
    with torch.no_grad():
        out = tr(**kw).sample
    assert torch.equal(out, ref)
    assert streamer.on == 0  # every streamed block left after its compute
    assert 1 <= streamer.most_on <= 2  # the one computing and one arriving, never more
    assert streamer.loads == n - 1 and streamer.host_s > 0  # each streamed block loaded once per call
    streamer.remove()
    assert not any(b._forward_pre_hooks or b._forward_hooks for _, b in C.stream_blocks(tr))
    assert "forward" not in vars(tr)



def test_a_component_called_again_and_again_gets_its_next_calls_first_blocks_early():
    """From the second call in its phase on, a call's end sends the next call's first blocks (their
    copies run behind the call's tail); a release (its phase ending) takes them off."""
    tr = flux_transformer(2, 3)
    kw = transformer_call()
    with torch.no_grad():
        ref = tr(**kw).sample
    streamer = BlockStreamer(tr, torch.device("cpu"), resident_blocks=1, prefetch=2)
    n = len(streamer.streamed)
    with torch.no_grad():
        assert torch.equal(tr(**kw).sample, ref)
        assert streamer.on == 0 and streamer.loads == n  # one call: nothing carried over
        assert torch.equal(tr(**kw).sample, ref)
        assert streamer.on == 2 and streamer.loads == 2 * n + 2  # called twice: the next call's first two sent
        assert torch.equal(tr(**kw).sample, ref)
        assert streamer.loads == 3 * n + 2  # the carried ones were not loaded again (and two more sent)
    streamer.release()
    assert streamer.on == 0 and streamer.calls == 0

    def broken(*a, **k):
        raise RuntimeError("stopped half-way")
    with torch.no_grad():
        tr(**kw)
        tr(**kw)
        assert streamer.on == 2
        streamer.streamed[-1].module.forward = broken
        with pytest.raises(RuntimeError, match="half-way"):
            tr(**kw)
    assert streamer.on == 0 and streamer.calls == 0  # a call that stopped released everything

def _plan(pipe, transformer: Choice) -> Plan:
    comps = {n: Choice("bf16", "resident", False) for n in C.discover(pipe)}
    comps["transformer"] = transformer
    return Plan(components=comps, predicted_latency_s=1.0, predicted_peak_bytes=1, budget_bytes=1 << 34,
                hardware=detect().to_dict(), pipeline=fingerprint(pipe), phases=[])


@pytest.mark.parametrize("scheme", ["int8-weight", "nf4", "bf16"])
def test_a_partly_resident_streamed_transformer_makes_the_same_image(scheme):
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    images = {}
    for placement, k in (("resident", None), ("streamed", 1)):
        pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
        # apply_checked skips the device checks that keep streaming to GPUs: the CPU stands in.
        apply_checked(pipe, _plan(pipe, Choice(scheme, placement, False, resident_blocks=k, prefetch=2)),
                      torch.device("cpu"), progress=False)
        images[placement] = np.asarray(pipe(**tiny_flux_call(seed=0)).images)
        if placement == "streamed":
            streamer = pipe._tierquant_streamers["transformer"]
            assert streamer.on == 0 and streamer.most_on >= 1
            assert len(streamer.resident) == 1
            # two steps: the second sent the next call's first two blocks, the VAE's phase took them off
            assert streamer.loads == 2 * len(streamer.streamed) + 2
    if scheme == "nf4":
        # bitsandbytes on a CPU repacks an NF4 weight at its first call (into the quantization state
        # it shares with the host copy), so a streamed copy is not bit-identical there; close, though.
        mse = float(np.mean((images["resident"] - images["streamed"]) ** 2))
        assert 10 * np.log10(1 / max(mse, 1e-12)) >= 40
    else:
        assert np.array_equal(images["resident"], images["streamed"])


def test_streamed_compiled_blocks_compile_once_per_block_class(monkeypatch):
    """Seven blocks of two classes: compiled graphs follow the classes, not the blocks."""
    from tierquant.compilation import compile_regions

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": counting}))
    torch._dynamo.reset()
    tr = flux_transformer(3, 4)
    BlockStreamer(tr, torch.device("cpu"), resident_blocks=2, prefetch=1)
    classes = compile_regions(tr, fullgraph=True, hooks_outside=True)
    kw = transformer_call()
    with torch.no_grad():
        tr(**kw)
        tr(**kw)  # a second step: nothing new to compile
    assert set(classes) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    # One graph per class, plus at most one variant per class for an input laid out differently (the
    # first single block's input is a slice of a concatenation: other strides). Never one per block.
    assert len(classes) <= len(graphs) <= 2 * len(classes) < 7


def test_the_fit_check_counts_a_streamed_components_resident_blocks():
    from tierquant.checks import on_device_bytes
    from tierquant.pipelines.builtin import build

    tr = build("flux-dev", device="meta").transformer
    kept = [on_device_bytes(tr, Choice("fp8-dynamic", "streamed", True, resident_blocks=k)) for k in (0, 21, 56)]
    whole = on_device_bytes(tr, Choice("fp8-dynamic", "resident", True))
    assert kept[0] < kept[1] < kept[2] < whole
    assert on_device_bytes(tr, Choice("fp8-dynamic", "swapped", True)) == 0


def test_host_copies_that_cannot_be_pinned_are_counted_and_named_in_one_warning(monkeypatch):
    """Where CUDA is present but a tensor cannot be pinned, its copies block the host: the streamer
    counts those bytes, and applying records them and warns once, naming the component."""
    from tierquant.placement import UnpinnedWarning, note_unpinned
    from tierquant.tensors import module_bytes

    tr = flux_transformer(2, 3)
    quantize(tr, "int8-weight")
    # A CPU build cannot pin: with CUDA said to be there, every host copy counts as unpinned.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    streamer = BlockStreamer(tr, torch.device("cpu"), resident_blocks=2, prefetch=1)
    moving = sum(module_bytes(sw.module) for sw in streamer.streamed)
    assert streamer.unpinned_bytes == moving > 0
    record = {}
    with pytest.warns(UnpinnedWarning, match=r"transformer \d+\.\d\d GiB"):
        note_unpinned(record, {"transformer": streamer}, None)
    assert record["transformer"]["unpinned_bytes"] == moving
    streamer.remove()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quiet = BlockStreamer(tr, torch.device("cpu"), resident_blocks=2, prefetch=1)
    assert quiet.unpinned_bytes == 0  # no GPU: nothing to pin, nothing to warn about
    quiet.remove()


class _FakeEvent:
    """A CUDA event on a made-up clock: `record` reads the clock, `elapsed_time` subtracts. Like
    torch.cuda.Event, it does not say whether it was made with timing."""
    now = 0.0

    def __init__(self, enable_timing=False):
        self._timing, self.t = enable_timing, None

    def record(self, stream=None):
        _FakeEvent.now += 1.0
        self.t = _FakeEvent.now

    def elapsed_time(self, other):
        assert self._timing and other._timing, "timing a CUDA event made without enable_timing"
        return other.t - self.t


class _FakeStream:
    def wait_event(self, e):
        pass

    def wait_stream(self, s):
        pass


def test_the_load_clock_times_every_load_and_wait_on_the_cuda_path(monkeypatch):
    """The streamer's CUDA branch with a clock set, on made-up events and streams: every load is timed
    (bytes, copy time) and every wait for a timed copy is counted; loads before the clock are not."""
    from contextlib import nullcontext

    from tierquant.streaming import LoadClock

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: None)
    tr = flux_transformer(2, 3)
    streamer = BlockStreamer(tr, torch.device("cpu"), resident_blocks=1, prefetch=1)
    streamer.cuda, streamer.side = True, _FakeStream()
    kw = transformer_call()
    with torch.no_grad():
        tr(**kw)
        streamer.clock = LoadClock()
        tr(**kw)
        tr(**kw)  # its first blocks were sent at the end of the call before, with the clock on
    got = streamer.clock.read()
    n = len(streamer.streamed)
    assert got["loads"] == streamer.loads - n  # the first call's loads were before the clock
    # two calls' blocks, and the next call's first block, sent as the last call ended
    assert got["bytes"] == 2 * sum(sw.nbytes for sw in streamer.streamed) + streamer.streamed[0].nbytes
    assert got["waits"] == 2 * n  # the compute waited on each timed copy once
    assert got["copy_ms"] > 0 and got["gbps_median"] > 0
    assert got["waits_over_0.1ms"] == 0  # the made-up copies end before the compute reaches them
    assert streamer.clock.read()["loads"] == 0  # a read starts over


def test_a_phase_switch_releases_the_last_phase_before_the_next_streamer_copies(monkeypatch):
    """Two streamed components in two phases: when the second is called, the first's blocks are
    released (and the cache emptied, on a GPU) before the second sends its first blocks, whatever
    order the hooks were added in: the memory model charges each phase its own window only."""
    from tierquant import placement, streaming
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    order = []
    real_start, real_release = streaming.BlockStreamer.start, streaming.BlockStreamer.release
    monkeypatch.setattr(streaming.BlockStreamer, "start",
                        lambda self: (order.append(("start", self.module)), real_start(self))[1])
    monkeypatch.setattr(streaming.BlockStreamer, "release",
                        lambda self: (order.append(("release", self.module)), real_release(self))[1])
    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = _plan(pipe, Choice("bf16", "streamed", False, resident_blocks=1, prefetch=1))
    plan.components["text_encoder_2"] = Choice("bf16", "streamed", False, resident_blocks=0, prefetch=1)
    apply_checked(pipe, plan, torch.device("cpu"), progress=False)
    pipe(**tiny_flux_call(seed=0))
    te, tr = pipe.text_encoder_2, pipe.transformer
    first_start = order.index(("start", tr))
    assert ("release", te) in order[:first_start]  # the encoder's phase ended before the transformer's copies
    assert placement.HOOK == next(iter(vars(tr)["_tierquant_hooks"].hooks))  # the switch is the outermost hook


def test_a_plan_that_lists_its_streamed_blocks_streams_those_and_makes_the_same_image():
    """`Choice.streamed` (a plan spread by compute) names the blocks that stream; applying streams
    exactly those, keeps the others on the device, and the image does not change."""
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    ref = tiny_flux(seed=0, dtype=torch.bfloat16)
    apply_checked(ref, _plan(ref, Choice("int8-weight", "resident", False)), torch.device("cpu"), progress=False)
    want = np.asarray(ref(**tiny_flux_call(seed=0)).images)
    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    blocks = [b for _, b in C.stream_blocks(pipe.transformer)]
    listed = [0, len(blocks) - 1]
    ch = Choice("int8-weight", "streamed", False, resident_blocks=len(blocks) - 2, prefetch=1, streamed=listed)
    assert ch.streamed_indices(len(blocks)) == listed
    apply_checked(pipe, _plan(pipe, ch), torch.device("cpu"), progress=False)
    streamer = pipe._tierquant_streamers["transformer"]
    assert [sw.module for sw in streamer.streamed] == [blocks[j] for j in listed]
    assert streamer.resident == [b for j, b in enumerate(blocks) if j not in listed]
    assert np.array_equal(np.asarray(pipe(**tiny_flux_call(seed=0)).images), want)


def test_a_plan_listing_blocks_the_pipeline_lacks_is_refused_before_anything_changes():
    import tierquant
    from tierquant.errors import PlanMismatchError
    from tierquant.pipelines.tiny import tiny_flux

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    n = len(C.stream_blocks(pipe.transformer))
    plan = _plan(pipe, Choice("bf16", "streamed", False, resident_blocks=0, streamed=[0, n]))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(PlanMismatchError, match=f"streams block {n}, this component has {n} blocks"):
        tierquant.apply(pipe, plan, device="cpu", progress=False)
    assert getattr(pipe, "_tierquant", None) is None
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())
