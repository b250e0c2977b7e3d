"""slimlm: turn a Large Language Model into a Small Language Model that llama.cpp runs.

Public API: `load`, `compress`, `export_gguf`, `evaluate`, `Report`, and the `FORMATS` table.
"""
from .compress import CompressConfig, compress
from .errors import SlimlmError
from .eval import evaluate
from .formats import FORMATS, get_format
from .gguf.writer import export_gguf
from .model import Model, load
from .presets import PRESETS, get_preset
from .report import Report

__version__ = "0.1.0"
__all__ = ["load", "Model", "compress", "CompressConfig", "export_gguf", "evaluate", "Report", "FORMATS",
           "get_format", "PRESETS", "get_preset", "SlimlmError", "__version__"]
