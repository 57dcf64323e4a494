"""Export errors: each message says what is wrong and how to fix it."""

from __future__ import annotations


class ExportError(ValueError):
    """The export cannot proceed (bad input, unwritable output, failed parity...)."""


class UnsupportedArchitecture(ExportError):
    """The model's architecture has no graph builder."""


class ParityError(ExportError):
    """The exported graph disagrees with the PyTorch reference."""
