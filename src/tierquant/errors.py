"""Every error tierquant raises on bad input derives from TierquantError, so the CLI can print
one clear line for each instead of a traceback."""


class TierquantError(ValueError):
    """Bad input or an impossible request; the message says what to do."""
