"""Every error tierquant raises on bad input. All derive from TierquantError, so the CLI prints one
clear line for each instead of a traceback, and users catch one class."""


class TierquantError(ValueError):
    """Bad input or an impossible request; the message says what to do."""


class SchemeError(TierquantError):
    """An unknown scheme, or one that cannot run where it was asked to."""


class BackendMissingError(TierquantError):
    """A scheme's library cannot be imported."""


class HardwareError(TierquantError):
    """An unknown target or GPU, or an unreadable budget."""


class PlanError(TierquantError):
    """A plan file or object that cannot be used."""


class PlanMismatchError(PlanError):
    """The plan was made for another pipeline."""


class PlanNotRunnableError(PlanError):
    """A scheme or placement of the plan cannot run on this device."""


class DeviceMismatchError(PlanError):
    """The plan was made for another kind of device (a GPU plan on a CPU-only machine, or the reverse)."""


class UnsupportedOptionError(TierquantError):
    """The pipeline's __call__ does not take an option the user gave."""


class NoPlanError(TierquantError):
    """No plan fits the budget; `smallest_bytes` is the budget the smallest plan needs."""

    def __init__(self, message: str, smallest_bytes: int | None = None):
        super().__init__(message)
        self.smallest_bytes = smallest_bytes
