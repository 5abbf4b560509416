"""Known-harmless messages from the backend libraries, dropped narrowly (by logger and message) so
that what tierquant prints is about the user's work."""
import logging
import re

# torchao logs a warning for each optional CUDA extension a CPU build cannot load; they are noise here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class _DropHarmless(logging.Filter):
    """Drops one logger's records whose message matches `pattern`; everything else passes."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to drop
            return True


# Warnings the backends print on every run that say nothing about the user's work, each matched
# narrowly, on the logger that emits it:
# - diffusers (0.42) with torchao 0.18: its torch.load safe-globals list names torchao classes that
#   moved; tierquant saves diffusers models holding torchao tensors with torch.save and loads them back.
# - bitsandbytes on a CPU with AVX512-BF16: an optional faster kernel package (`kernels`) is missing;
#   its own CPU kernels run instead.
# - diffusers' ModelMixin.to(dtype) warns about modules to keep in float32 even when there are none.
_HARMLESS = {
    "diffusers.quantizers.torchao.torchao_quantizer": r"^Unable to import `torchao` Tensor objects",
    "bitsandbytes.backends.cpu.ops": r"^Failed to load CPU gemm_4bit_forward from kernels-community",
    "diffusers.models.modeling_utils": r"that should be kept in float32: \[\]\.",
}
for _name, _pattern in _HARMLESS.items():
    logging.getLogger(_name).addFilter(_DropHarmless(_pattern))
