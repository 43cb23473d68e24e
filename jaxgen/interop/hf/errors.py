"""The error every HF interop failure raises."""

from __future__ import annotations


class InteropError(ValueError):
    """A checkpoint that cannot be read, mapped or written; the message names the file or tensor."""


def unsupported(arch: str, what: str) -> InteropError:
    """The error for a HF setting jaxgen cannot reproduce exactly."""
    return InteropError(
        f"{arch}: {what} has no jaxgen equivalent, so the model cannot be loaded exactly"
    )
