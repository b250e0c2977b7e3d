"""Typed errors that the CLI turns into one clear message and a non-zero exit (RELIABILITY.md "R0").

Every error raised for a user's input names the file, the field or tensor, the value found and what was
expected; the CLI prints `error: <message>` without a traceback.
"""
from __future__ import annotations


class SlimlmError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class InvalidModelError(SlimlmError):
    """A model file or folder is malformed, unsupported or inconsistent."""


class InvalidGGUFError(InvalidModelError):
    """A GGUF file violates the format (bad magic, counts beyond the file, overlapping tensors, ...)."""


class InvalidSafetensorsError(InvalidModelError):
    """A safetensors file violates the format."""


class UnsafeModelError(InvalidModelError):
    """The model asks for something slimlm refuses by default (pickle checkpoints, remote code)."""


class ConfigError(SlimlmError):
    """An argument or configuration value is out of range."""


class OutputError(SlimlmError):
    """The output path cannot be written (exists, is the input, folder missing, locked, disk full)."""


class NumericsError(SlimlmError):
    """NaN/Inf in weights or activations."""


class MissingDependencyError(SlimlmError):
    """An optional dependency (llama-cpp-python, the default model package) is not installed."""
