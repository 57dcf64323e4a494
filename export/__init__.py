"""cosine.export: ONNX engines built directly from Hugging Face / GGUF weights.

Public API (heavy modules load on first use):
    export_engine(model, out_dir, dtype="float32", provider="cpu", name=None,
                  check_parity=True, progress=True) -> manifest dict     (build.py)
    make_tiny_model(out_dir, arch="llama"|"qwen2"|"gpt2", seed=0, ...) -> Path  (tiny.py)
    check_parity(engine_dir, torch_model, manifest, provider="cpu") -> dict  (parity.py)
    ExportError, UnsupportedArchitecture, ParityError                    (errors.py)
"""

from __future__ import annotations

from typing import Any

from .errors import ExportError, ParityError, UnsupportedArchitecture

__all__ = ["export_engine", "make_tiny_model", "check_parity", "ExportError", "UnsupportedArchitecture",
           "ParityError"]

_LAZY = {"export_engine": ".build", "make_tiny_model": ".tiny", "check_parity": ".parity"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
