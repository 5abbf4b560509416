"""One way to wrap a component's entry points (forward, encode, decode, ...): hooks in a registry,
each removable by name, in the spirit of diffusers' ModelHook and HookRegistry.

    registry = HookRegistry.of(vae)
    registry.add("profiler", hook, methods=["forward", "decode"])
    ...
    registry.remove("profiler")      # the other hooks (a placement's phase switch, say) stay

The profiler, the sensitivity capture and the placements all use it, so removing one never
removes another's wrapper. A hook's `around` runs the call; the first hook added runs outermost,
unless a later one is added `outer` (the phase switch: it must happen before anything else of a call).
Wrappers live in the instance's __dict__; when the last hook goes, the original attributes come
back (unless something else has wrapped over them since, in which case ours stays as a pass-through).
"""
from __future__ import annotations

import functools

ATTR = "_tierquant_hooks"


class Hook:
    """Override `pre_call` / `post_call`, or `around` for full control of the call."""

    def pre_call(self, obj, method: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def post_call(self, obj, method: str, output):
        return output

    def around(self, call, obj, method: str, args: tuple, kwargs: dict):
        args, kwargs = self.pre_call(obj, method, args, kwargs)
        return self.post_call(obj, method, call(*args, **kwargs))


class _Entry:
    """The wrapper that stands in an object's __dict__ for one method. An object (not a closure) so
    that deep-copying a hooked module gives a copy with no hooks that calls its own methods."""

    def __init__(self, registry: "HookRegistry", method: str, original, had: bool, saved):
        self.registry, self.method, self.original, self.had, self.saved = registry, method, original, had, saved
        functools.update_wrapper(self, original)
        self.__wrapped__ = original

    def __call__(self, *args, **kwargs):
        hooks = [h for h, methods in self.registry.hooks.values() if self.method in methods]

        def call(i, a, k):
            if i == len(hooks):
                return self.original(*a, **k)
            return hooks[i].around(lambda *a2, **k2: call(i + 1, a2, k2), self.registry.obj, self.method, a, k)

        return call(0, args, kwargs)

    def __deepcopy__(self, memo):
        import copy

        return _Entry(copy.deepcopy(self.registry, memo), self.method, copy.deepcopy(self.original, memo),
                      self.had, copy.deepcopy(self.saved, memo))


class HookRegistry:
    def __init__(self, obj):
        self.obj = obj
        self.hooks: dict[str, tuple[Hook, frozenset]] = {}  # name -> (hook, methods), in order added
        self.entries: dict[str, _Entry] = {}

    @classmethod
    def of(cls, obj) -> "HookRegistry":
        reg = vars(obj).get(ATTR)
        if reg is None:
            reg = cls(obj)
            vars(obj)[ATTR] = reg
        return reg

    @classmethod
    def get(cls, obj) -> "HookRegistry | None":
        return vars(obj).get(ATTR)

    def add(self, name: str, hook: Hook, methods, outer: bool = False) -> Hook:
        """Register `hook` on `methods`: inside the hooks added before it, or outside all of them (`outer`)."""
        if name in self.hooks:
            raise ValueError(f"a hook named {name!r} is already registered on {type(self.obj).__name__}")
        methods = frozenset(m for m in methods if callable(getattr(self.obj, m, None)))
        if outer:
            self.hooks = {name: (hook, methods), **self.hooks}
        else:
            self.hooks[name] = (hook, methods)
        d = vars(self.obj)
        for m in methods:
            if m not in self.entries:
                self.entries[m] = _Entry(self, m, getattr(self.obj, m), m in d, d.get(m))
                d[m] = self.entries[m]
        return hook

    def remove(self, name: str) -> Hook | None:
        hook, _ = self.hooks.pop(name, (None, ()))
        still = {m for _, ms in self.hooks.values() for m in ms}
        d = vars(self.obj)
        for m in [m for m in self.entries if m not in still]:
            entry = self.entries[m]
            if d.get(m) is entry:  # nothing wrapped over ours since: put the original back
                del self.entries[m]
                if entry.had:
                    d[m] = entry.saved
                else:
                    d.pop(m, None)
        if not self.hooks and not self.entries and d.get(ATTR) is self:
            del d[ATTR]
        return hook

    def __contains__(self, name: str) -> bool:
        return name in self.hooks

    def __deepcopy__(self, memo):
        return HookRegistry(None)  # a copy of a hooked module is not hooked


def add_hook(obj, name: str, hook: Hook, methods, outer: bool = False) -> Hook:
    return HookRegistry.of(obj).add(name, hook, methods, outer)


def remove_hook(obj, name: str) -> Hook | None:
    reg = HookRegistry.get(obj)
    return reg.remove(name) if reg is not None else None
