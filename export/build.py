"""``export_engine``: Hugging Face directory or GGUF file -> engine directory.

Phases (each logged with its duration on logger "cosine.export"): check inputs, load
the PyTorch model, stream weights into model.onnx.data while emitting the graph,
tokenizer, PyTorch parity reference, free the model, ONNX Runtime parity, manifest.
The manifest is written last and only when parity passed (or was skipped on request),
so a directory with manifest.json is a checked engine.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from . import chat_template, gpt2, llama
from .errors import ExportError, ParityError, UnsupportedArchitecture
from .graph import COSINE_DOMAIN, DATA_FILE, FUSED_OPSET, OPSET, GraphBuilder
from .layers import ModelSpec, io_description
from .runtime import PROVIDERS, check_provider
from .weights import QUANTIZE, Weights, resolve_matmul
from cosine.workers.engine import FORMAT_VERSION

log = logging.getLogger("cosine.export")

EXPORTER_VERSION = "0.1.0"
DTYPES = ("float32", "float16")
GRAPHS = llama.GRAPHS
_BUILDERS = {**{t: llama for t in llama.MODEL_TYPES}, **{t: gpt2 for t in gpt2.MODEL_TYPES}}
SUPPORTED = tuple(_BUILDERS) + ("smollm (llama architecture)",)
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


def _peak_rss_mib() -> float:
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes


@contextlib.contextmanager
def _phase(what: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    log.info("%s: %.2fs (peak RSS so far %.0f MiB)", what, time.perf_counter() - t0, _peak_rss_mib())


def _sha256(files: list[Path]) -> str:
    """sha256 over the files' bytes in the given order, streamed (no whole-file reads)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


class _Source:
    """Where the weights come from: an HF directory or one GGUF file."""

    def __init__(self, model: str | Path) -> None:
        p = Path(model).expanduser()
        if not p.exists():
            raise ExportError(f"model path {p} does not exist; pass a Hugging Face model directory "
                              f"(config.json + *.safetensors) or a .gguf file")
        self.path = p.resolve()
        self.gguf: str | None = None
        if p.is_file():
            with open(p, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                raise ExportError(f"{p} is not a GGUF file (magic {magic!r}, expected b'GGUF'); pass a .gguf "
                                  f"file or a Hugging Face model directory")
            self.dir, self.gguf, self.files = p.parent, p.name, [p]
            return
        if not (p / "config.json").is_file():
            raise ExportError(f"{p} has no config.json; pass a Hugging Face model directory "
                              f"(as written by save_pretrained) or a .gguf file")
        files = sorted({f for g in _WEIGHT_GLOBS for f in p.glob(g)})
        if not files:
            raise ExportError(f"{p} has no weights (*.safetensors or pytorch_model*.bin); "
                              f"download the weight files next to config.json")
        self.dir, self.files = p, files

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf} if self.gguf else {}

    def load_config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.dir, **self.kwargs())
        except Exception as e:
            what = "GGUF file" if self.gguf else "config.json"
            raise ExportError(f"could not read the {what} of {self.path}: {e}") from e

    def load_model(self, progress: bool = True) -> Any:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        if not progress:
            hf_logging.disable_progress_bar()
        if self.gguf:
            return self._load_gguf()

        try:
            model = AutoModelForCausalLM.from_pretrained(self.dir, dtype=torch.float32, attn_implementation="eager",
                                                         low_cpu_mem_usage=True, **self.kwargs())
        except Exception as e:
            raise ExportError(f"could not load the weights of {self.path}: {type(e).__name__}: {e}") from e
        return model.eval()

    def _load_gguf(self) -> Any:
        """GGUF -> float32 PyTorch model without ``accelerate`` (which transformers'
        from_pretrained(gguf_file=...) insists on): the model skeleton is built on the meta
        device and the dequantized tensors are assigned into it, so only one copy of the
        weights ever exists."""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = self.load_config()
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
            parsed = load_gguf_checkpoint(str(self.path), return_tensors=True, model_to_load=model,
                                          torch_dtype=torch.float32)
        except Exception as e:
            raise ExportError(f"could not load the weights of {self.path}: {type(e).__name__}: {e}") from e
        _, unexpected = model.load_state_dict(parsed.pop("tensors"), strict=False, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        rot = getattr(getattr(model, "model", None), "rotary_emb", None)
        if rot is not None:  # non-persistent buffers (inv_freq) were never materialized
            model.model.rotary_emb = type(rot)(config=config)
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta or unexpected:
            raise ExportError(f"{self.path}: GGUF tensors do not match the {config.model_type} model "
                              f"(missing: {meta[:5]}, unexpected: {list(unexpected)[:5]})")
        return model.eval()

    def write_tokenizer(self, out: Path) -> None:
        """Copy tokenizer.json verbatim when the directory has one (AutoTokenizer may
        rebuild parts of it per model class); otherwise save the fast tokenizer's backend."""
        if not self.gguf and (self.dir / "tokenizer.json").is_file():
            shutil.copyfile(self.dir / "tokenizer.json", out / "tokenizer.json")
            return
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.dir, **self.kwargs())
            backend = tok.backend_tokenizer
        except Exception as e:
            raise ExportError(f"could not build a fast tokenizer for {self.path} (put its tokenizer.json next "
                              f"to config.json): {str(e).splitlines()[0]}") from e
        backend.save(str(out / "tokenizer.json"))


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".cosine-export-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ExportError(f"output directory {out} is not writable ({e.strerror or e}); "
                          f"choose another --out") from e


def _arch_module(config: Any):
    mt = getattr(config, "model_type", None)
    if mt not in _BUILDERS:
        raise UnsupportedArchitecture(f"unsupported architecture {mt}; supported: {', '.join(SUPPORTED)}")
    return _BUILDERS[mt]


def _eos_ids(model: Any, config: Any) -> list[int]:
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        for x in (e if isinstance(e, (list, tuple)) else [e]):
            if x is not None and int(x) not in ids:
                ids.append(int(x))
    return ids


def _tensor_reader(model: Any):
    sd = model.state_dict()  # references, not copies
    import torch

    def tensor(name: str):
        return sd[name].detach().to(torch.float32).numpy()

    return tensor, set(sd)


def _rope(model: Any) -> tuple[Any, float]:
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rot is None:
        return None, 1.0
    return rot.inv_freq.detach().float().numpy(), float(getattr(rot, "attention_scaling", 1.0))


def export_engine(model: str | Path, out_dir: str | Path, dtype: str = "float32", provider: str = "cpu",
                  name: str | None = None, check_parity: bool = True, progress: bool = True,
                  parity_tolerance: float | None = None, parity_seed: int = 0, graph: str | None = None,
                  quantize: str = "none", matmul: str = "auto") -> dict[str, Any]:
    """Export ``model`` (HF directory or .gguf file) to an engine in ``out_dir``; returns
    the manifest. ``graph``: "fused" kernels (the default where the architecture has
    them) or the "plain" reference graph; ``quantize`` and ``matmul``: weights.py
    ("auto": the GGUF kernel for a GGUF file's blocks on CPU where it builds, else
    MatMulNBits). Raises ExportError (UnsupportedArchitecture, ParityError) with a hint."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from here
    t_all = time.perf_counter()
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if provider not in PROVIDERS:
        raise ExportError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if graph is not None and graph not in GRAPHS:
        raise ExportError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    if quantize not in QUANTIZE:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize != "none" and dtype != "float32":
        raise ExportError(f"--quantize {quantize} computes around float32 activations; use --dtype float32 "
                          f"(the CUDA float16 path takes float weights)")
    matmul = resolve_matmul(matmul, quantize, provider)
    src = _Source(model)
    if quantize == "gguf" and not src.gguf:
        raise ExportError(f"--quantize gguf carries a GGUF file's blocks over, but {src.path} is not a .gguf file; "
                          f"use --quantize int4 or int8 for other sources")
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    check_provider(provider)
    with _phase("config"):
        config = src.load_config()
        arch = _arch_module(config)
        arch.spec_for(config)  # shape/feature checks before the (slow) weight load
        graph = graph or ("plain" if arch is gpt2 else "fused")
        if arch is gpt2 and (graph, quantize) != ("plain", "none"):
            raise ExportError("gpt2 engines are built as the plain float graph only: no --graph fused, "
                              "no --quantize")
        if graph == "plain" and quantize != "none":
            raise ExportError(f"--quantize {quantize} builds the fused graph (MatMulNBits); the plain graph is the "
                              f"float reference: drop --graph plain")
    for stale in ("manifest.json", "parity_failed.json"):  # an interrupted export is not an engine
        (out / stale).unlink(missing_ok=True)

    with _phase("tokenizer"):  # before the slow weight load: a missing tokenizer fails fast
        src.write_tokenizer(out)
        chat_template.store(src.path, out)  # chat_template.jinja for the HTTP API's chat completions
    with _phase(f"load {src.path.name} ({config.model_type})"):
        torch_model = src.load_model(progress)
    with _phase("source sha256"):
        source_sha = _sha256(src.files)

    with _phase(f"graph + weights ({graph} graph, {dtype}, quantize {quantize}, matmul {matmul})"):
        g = GraphBuilder(out, dtype, opset=FUSED_OPSET if graph == "fused" else OPSET)
        try:
            tensor, names = _tensor_reader(torch_model)
            blocks = None
            if quantize == "gguf":
                from .gguf_weights import GGUFMatrices

                blocks = GGUFMatrices(src.path, torch_model, config)
            weights = Weights(tensor, names, quantize, blocks, matmul=matmul)
            inv_freq, rope_scale = _rope(torch_model)
            spec: ModelSpec = arch.build(g, config, weights, inv_freq=inv_freq, rope_scale=rope_scale, graph=graph,
                                         progress=progress)
        finally:
            g.close()
        g.save(f"cosine-{spec.model_type}", metadata={"cosine.exporter_version": EXPORTER_VERSION})
        log.info("wrote %s (%d nodes) and %s (%.1f MiB)", out / "model.onnx", len(g.nodes), DATA_FILE,
                 g.bytes_written / 2**20)

    eos_ids = _eos_ids(torch_model, config)
    bos = getattr(getattr(torch_model, "generation_config", None), "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)

    inputs, outputs = io_description(spec, dtype, key_slots=graph == "fused")
    facts = {**{k: v for k, v in spec.as_dict().items()}, "dtype": dtype}
    parity: dict[str, Any] = {"passed": None, "skipped": "disabled with --no-parity"}
    quantization: dict[str, Any] | None = None
    if check_parity:
        from . import parity as par

        with _phase("parity reference (PyTorch)"):
            ref, case = par.reference_case(torch_model, facts, seed=parity_seed)
            text = par.reference_text(torch_model, out, spec.vocab_size) if quantize != "none" else None
            if dtype == "float16" and parity_tolerance is None:
                parity_tolerance = par.float16_tolerance(torch_model, case, ref, provider)
        del torch_model, tensor, weights, blocks
        gc.collect()  # the ONNX session below should not coexist with the PyTorch weights
        if dtype == "float16" and provider == "cpu" and not _cpu_runs_fp16(out):
            parity = {"passed": None, "skipped": "onnxruntime's CPU provider cannot run this float16 graph; "
                      "run cosine-export --provider cuda on a GPU machine to check float16 parity"}
            log.warning("parity skipped: %s", parity["skipped"])
        else:
            parity, quantization = _parity(out, src, case, ref, text, facts, provider, parity_tolerance, quantize)
    else:
        del torch_model, tensor, weights, blocks
        gc.collect()
        if provider == "tensorrt":
            from .runtime import session

            with _phase("TensorRT engine build (cached in trt_cache/)"):
                session(out, provider)

    manifest = {
        "format": "cosine-engine", "format_version": FORMAT_VERSION, "exporter_version": EXPORTER_VERSION,
        "name": name or (src.path.stem if src.gguf else src.path.name),
        "architecture": spec.architecture, "model_type": spec.model_type,
        "source": str(src.path), "source_sha256": source_sha,
        "source_files": [f.name for f in src.files],
        "dtype": dtype, "opset": g.opset, "graph": graph, "kv_layout": "heads-major",
        "num_layers": spec.num_layers, "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "hidden_size": spec.hidden_size, "vocab_size": spec.vocab_size,
        "max_positions": spec.max_positions, "eos_token_ids": eos_ids,
        "bos_token_id": None if bos is None else int(bos),
        "inputs": inputs, "outputs": outputs, "parity": parity,
        "providers_built": [provider],
        "quantization": quantization or ({"mode": quantize} if quantize != "none" else None),
        # int8: MatMulNBits quantizes activations per block (accuracy level 4): fast on a CPU,
        # but a forward's results then depend on its shape (docs/export.md, "Exactness")
        "activations": "int8" if quantize != "none" else dtype,
        "matmul": matmul if quantize != "none" else None,
        **_row_facts(g, quantize),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sw = getattr(config, "sliding_window", None)
    if sw and spec.architecture == "llama" and getattr(config, "use_sliding_window", True):
        manifest["sliding_window"] = int(sw)  # attention is whatever the mask says; > sw needs a windowed mask
        log.warning("%s declares sliding_window=%d; the engine attends per the mask it is given", src.path, sw)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    log.info("engine %s ready in %.1fs (parity %s)", out, time.perf_counter() - t_all,
             {True: "passed", False: "FAILED", None: "skipped"}[parity["passed"]])
    return manifest


def _row_facts(g: GraphBuilder, quantize: str) -> dict[str, Any]:
    """Manifest facts about the graph's products: the operator libraries it needs and
    whether a one-row forward equals that row of a many-row forward bit for bit, which
    spares a target the padding of its decode steps (workers/batching.py). That holds when
    no 4-bit MatMulNBits is left (its one-row kernel rounds differently; the 8-bit one
    and GGUFMatMul do not: tests/test_kernel_rows.py, tests/test_gguf_kernel.py)."""
    from cosine.workers import kernels

    facts: dict[str, Any] = {}
    if any(n.domain == COSINE_DOMAIN for n in g.nodes):
        facts[kernels.MANIFEST_KEY] = kernels.NAME
    four_bit = any(n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in n.attribute)
                   for n in g.nodes)
    facts["one_row_exact"] = quantize != "none" and not four_bit
    return facts


def _parity(out: Path, src: _Source, case: Any, ref: Any, text: Any, facts: dict[str, Any], provider: str,
            tolerance: float | None, quantize: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(manifest "parity", manifest "quantization"); raises ParityError when it fails.

    A float engine must match PyTorch within the float tolerance. An engine with the GGUF
    file's own blocks must too, computed in float (MatMulNBits accuracy level 0): that
    proves its weights are the file's; what it ships computes with int8 activations, whose
    top-1 agreement with PyTorch on real text goes into "quantization", as it does for the
    requantized int4/int8 engines, whose weights differ from the float model by design.
    """
    from . import parity as par

    quantization = None
    parity: dict[str, Any] = {"passed": None, "skipped": f"{quantize} weights differ from the float model by "
                              "design; see quantization.top1_agreement"}
    if quantize in ("none", "gguf"):
        if quantize == "gguf" and tolerance is None:
            tolerance = par.BLOCKS_TOLERANCE
        with _phase(f"parity run (onnxruntime {provider})"), par.float_compute(out) as model_file:
            parity = par.finish_parity(out, case, ref, facts, provider, tolerance, model_file=model_file)
        if quantize == "gguf":
            parity["note"] = ("checked with every quantized product computed in float32 (MatMulNBits at "
                              "accuracy level 0; GGUFMatMul as a MatMul over gguf's dequantization of its rows): "
                              "the file's weights, in the graph that ships")
        if not parity["passed"]:
            (out / "parity_failed.json").write_text(json.dumps(parity, indent=2) + "\n")
            raise ParityError(
                f"parity FAILED for {src.path}: max |delta log-prob| {parity['max_abs_logprob_diff']:.3g} "
                f"(tolerance {parity['tolerance']:g}, worst diff/allowed "
                f"{parity['worst_diff_over_allowed']:.3g}, argmax match {parity['argmax_match']}); "
                f"the engine in {out} is not valid (no manifest.json written). Details: "
                f"{out / 'parity_failed.json'}")
    if quantize != "none":
        with _phase("top-1 agreement of the quantized engine with PyTorch on real text"):
            quantization = {"mode": quantize, **par.text_agreement(out, text, facts, provider)}
        log.info("%s engine: top-1 agreement with the float model %.3f over %d positions", quantize,
                 quantization["top1_agreement"], quantization["positions"])
    return parity, quantization


def _cpu_runs_fp16(out: Path) -> bool:
    """Whether the CPU provider can create a session for this float16 graph."""
    from .runtime import session

    try:
        session(out, "cpu")
        return True
    except ExportError as e:
        log.info("CPU provider cannot load the float16 graph: %s", str(e).splitlines()[0][:300])
        return False
