"""ONNX Runtime sessions for an exported engine, per provider (cpu / cuda / tensorrt).

The provider is checked before any export work starts, and a GPU provider never
silently falls back to CPU (a parity result from the wrong provider would be a lie).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ExportError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def check_provider(provider: str) -> None:
    """Raise ExportError with an install hint when ``provider`` cannot be used here."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ExportError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    if provider != "cpu" and hasattr(ort, "preload_dlls"):
        try:  # onnxruntime-gpu >= 1.21 can load CUDA/cuDNN from pip wheels
            ort.preload_dlls()
        except Exception:
            pass
    available = ort.get_available_providers()
    if PROVIDERS[provider] in available:
        return
    if provider == "tensorrt":
        raise ExportError(f"TensorRT is not installed (onnxruntime {ort.__version__} has no "
                          f"TensorrtExecutionProvider; available: {available}); install onnxruntime-gpu and "
                          f"TensorRT (pip install 'cosine[gpu,tensorrt]'). Note: this path is untested here")
    raise ExportError(f"provider {provider!r} needs CUDAExecutionProvider, which onnxruntime {ort.__version__} "
                      f"does not have (available: {available}); install onnxruntime-gpu "
                      f"(pip install 'cosine[gpu]') or use --provider cpu")


def session(engine_dir: Path, provider: str = "cpu", threads: int = 0, model_file: str = "model.onnx") -> Any:
    """An InferenceSession over ``engine_dir/model.onnx`` exactly as a worker builds it.

    For TensorRT, creating the session builds the TensorRT engine and caches it in
    ``engine_dir/trt_cache`` (the worker uses the same cache path).
    """
    import onnxruntime as ort

    check_provider(provider)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    _register_kernels(opts, Path(engine_dir) / model_file)
    if threads > 0:
        opts.intra_op_num_threads = threads
    providers: list[Any]
    if provider == "cpu":
        providers = ["CPUExecutionProvider"]
    elif provider == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": 0})]
    else:
        cache = Path(engine_dir) / "trt_cache"
        cache.mkdir(exist_ok=True)
        providers = [("TensorrtExecutionProvider", {"device_id": 0, "trt_engine_cache_enable": True,
                                                    "trt_engine_cache_path": str(cache)}),
                     ("CUDAExecutionProvider", {"device_id": 0})]
    try:
        sess = ort.InferenceSession(str(Path(engine_dir) / model_file), sess_options=opts, providers=providers)
    except Exception as e:
        raise ExportError(f"onnxruntime could not load {engine_dir}/{model_file} with {PROVIDERS[provider]}: {e}") from e
    got = sess.get_providers()[0]
    if got != PROVIDERS[provider]:
        raise ExportError(f"requested {PROVIDERS[provider]} but the session runs on {got}")
    return sess


def _register_kernels(opts: Any, model_path: Path) -> None:
    """cosine's operator library for a graph that imports its domain (the manifest,
    which the worker reads instead, is written after parity)."""
    import onnx

    from cosine.workers import kernels

    model = onnx.load(str(model_path), load_external_data=False)
    if any(o.domain == "cosine" for o in model.opset_import):
        try:
            kernels.register(opts, {kernels.MANIFEST_KEY: kernels.NAME})
        except kernels.KernelUnavailable as e:
            raise ExportError(f"{model_path} uses cosine's GGUF kernel: {e}") from None
