"""One way to wrap entry points: hooks removable by name, and what they leave behind."""
import copy

import torch
from torch import nn

import tierquant
from tierquant import components as C
from tierquant.checks import fingerprint
from tierquant.hardware import detect
from tierquant.hooks import Hook, HookRegistry, add_hook, remove_hook
from tierquant.placement import PhaseSwitcher
from tierquant.plan import Choice, Plan
from tierquant.sensitivity import capture_inputs


class Tagger(Hook):
    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    def pre_call(self, obj, method, args, kwargs):
        self.log.append(self.tag)
        return args, kwargs


class Doubler(Hook):
    def post_call(self, obj, method, output):
        return output * 2


def test_removing_one_hook_keeps_the_others_and_the_last_restores_the_module():
    m = nn.Linear(4, 4)
    log = []
    add_hook(m, "a", Tagger(log, "a"), ["forward"])
    add_hook(m, "b", Tagger(log, "b"), ["forward"])
    m(torch.zeros(1, 4))
    assert log == ["a", "b"]  # the first added runs outermost
    remove_hook(m, "a")
    m(torch.zeros(1, 4))
    assert log == ["a", "b", "b"]
    remove_hook(m, "b")
    assert "forward" not in vars(m) and HookRegistry.get(m) is None


def test_a_hook_changes_the_output_and_a_deep_copy_is_unhooked():
    m = nn.Linear(4, 4)
    x = torch.ones(1, 4)
    ref = m(x)
    add_hook(m, "double", Doubler(), ["forward"])
    assert torch.equal(m(x), 2 * ref)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    assert torch.equal(twin(x), torch.zeros(1, 4))  # its own weights, no hook
    assert torch.equal(m(x), 2 * ref)


def test_profiling_and_sensitivity_leave_an_applied_pipeline_swapping(tiny_flux_pipe, tiny_flux_kwargs):
    pipe = tiny_flux_pipe
    comps = C.discover(pipe)
    choices = {n: Choice("bf16", "swapped" if n in ("transformer", "vae") else "resident", False) for n in comps}
    plan = Plan(components=choices, predicted_latency_s=1.0, predicted_peak_bytes=1, budget_bytes=1 << 30,
                hardware=detect().to_dict(), pipeline=fingerprint(pipe),
                phases=[{"components": ["text_encoder", "text_encoder_2"]}, {"components": ["transformer"]},
                        {"components": ["vae"]}])
    # The swapping mechanics on the CPU (host to host): what matters is which phase switches happen.
    switcher = PhaseSwitcher(pipe, plan, comps, {"transformer", "vae"}, torch.device("cpu"))
    tierquant.profile(pipe, **tiny_flux_kwargs)
    capture_inputs(pipe, **tiny_flux_kwargs)
    switcher.calls.clear()
    pipe(**tiny_flux_kwargs)
    # The VAE is reached through `decode`, not `forward`: its phase switch must still happen.
    assert list(switcher.calls) == ["text_encoder", "transformer", "vae"]
