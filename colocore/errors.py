"""Errors that reach an operator: one line that says what failed and what to do."""


class ColocoreError(Exception):
    """A failure with a message fit for the operator (no traceback needed)."""


class StreamError(ColocoreError):
    """A snapshot or migration stream that is truncated, corrupted or foreign."""


class ChardevError(ColocoreError):
    """A chardev spec that cannot be parsed or opened."""


class GuestImageError(ColocoreError):
    """A kernel that is not a loadable Multiboot v1 ELF32 image."""
