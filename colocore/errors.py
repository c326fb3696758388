"""Errors that reach an operator: one line that says what failed and what to do."""


class ColocoreError(Exception):
    """A failure with a message fit for the operator (no traceback needed)."""


class StreamError(ColocoreError):
    """A snapshot or migration stream that is truncated, corrupted or foreign."""


class ChardevError(ColocoreError):
    """A chardev spec that cannot be parsed or opened."""


class GuestImageError(ColocoreError):
    """A kernel that is not a loadable Multiboot v1 ELF32 image."""


class QmpError(ColocoreError):
    """A QMP error: what a command refused (server side) or an error reply (client side).
    `error_class` is QEMU's: GenericError, CommandNotFound."""

    def __init__(self, desc, error_class="GenericError"):
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc
