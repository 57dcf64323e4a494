"""Quantized DRAFTER engines: a cost/acceptance trade-off, never a target.

A drafter only proposes; the target's verification decides every token, so a cheaper,
slightly less accurate drafter keeps the output exact and often wins on goodput. The
target must stay the parity-checked float engine, or the output would be the quantized
model's. Weight-only int4 (ONNX Runtime's MatMulNBits, block-wise, int8 compute) on every
MatMul and the LM head, or dynamic int8 (per-channel weights) on every MatMul (the LM head
stays float). The LM head matters most: a tied [vocab, hidden] head is a quarter to a half
of a small model's weights (Qwen2.5-0.5B: 545 MB in float32 against 180 MB for all the
int4 layers), and a decode step reads all of it.

Instead of a parity bound (quantization breaks 1e-4 by design) the manifest records
top-1 agreement with the float engine on the parity inputs, so the trade-off is visible.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import ExportError

log = logging.getLogger("cosine.export")
MODES = ("int8", "int4")


def quantize_engine(src: str | Path, out: str | Path, mode: str, block_size: int = 32) -> dict:
    """Quantize the float engine in ``src`` into ``out``; returns the new manifest."""
    import onnx

    src, out = Path(src), Path(out)
    if mode not in MODES:
        raise ExportError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    man_path = src / "manifest.json"
    if not man_path.is_file():
        raise ExportError(f"{src} is not an exported engine (no manifest.json); export the float model first")
    manifest = json.loads(man_path.read_text())
    if manifest.get("quantization"):
        raise ExportError(f"{src} is already quantized ({manifest['quantization']['mode']})")
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one line per node otherwise
    t0 = time.time()
    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src / "model.onnx", out / "model.onnx", weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    else:
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as e:
            raise ExportError(f"int4 needs {e.name} (pip install 'cosine[export]')") from None
        model = onnx.load(str(src / "model.onnx"), load_external_data=True)
        heads = _head_as_matmul(model)
        log.info("int4: LM head%s %s rewritten as MatMul over a transposed copy", "s" * (len(heads) > 1), heads)
        q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4)
        q.process()
        onnx.save_model(q.model.model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        del model, q
    shutil.copy2(src / "tokenizer.json", out / "tokenizer.json")
    seconds = time.time() - t0
    agreement = _agreement(src, out, manifest)
    manifest = {**manifest, "name": f"{manifest.get('name')}-{mode}", "parity": {**manifest["parity"], "note":
                "parity was checked on the float engine this one was quantized from"},
                "quantization": {"mode": mode, "block_size": block_size if mode == "int4" else None,
                                 "from": str(src), "seconds": round(seconds, 1), **agreement}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("quantized %s -> %s (%s) in %.0f s; top-1 agreement with the float engine %.3f",
             src, out, mode, seconds, agreement["top1_agreement"])
    return manifest


def _head_as_matmul(model) -> list[str]:
    """Rewrite ``Gemm(x, W, transB=1)`` with a constant W [V, H] (the LM head over a tied
    embedding, see export/layers.py) as ``MatMul(x, W^T)`` with its own [H, V] initializer,
    so that MatMulNBits can quantize it; the embedding's Gather keeps the float table.
    Returns the rewritten nodes' names."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = []
    for i, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits
                or attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0):
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        name = f"{node.input[1]}.T"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        model.graph.node[i].CopyFrom(helper.make_node("MatMul", [node.input[0], name], list(node.output),
                                                      name=node.name or f"lm_head_matmul_{i}"))
        done.append(model.graph.node[i].name)
    return done


SAMPLE_TEXT = ("def mean(xs):\n    \"\"\"Return the arithmetic mean of a non-empty list.\"\"\"\n"
               "    return sum(xs) / len(xs)\n\nThe quick brown fox jumps over the lazy dog, and the dog "
               "sleeps on in the warm afternoon sun while the river runs by.")


def _sample_ids(engine: Path, vocab: int, n: int, seed: int) -> np.ndarray:
    """Real text through the engine's tokenizer (random ids give flat, fragile argmaxes)."""
    try:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(engine / "tokenizer.json")).encode(SAMPLE_TEXT).ids[:n]
        if len(ids) >= 8 and max(ids) < vocab:
            return np.asarray(ids, np.int64)[None]
    except Exception:  # tiny test tokenizers may not cover the text: fall back to random ids
        pass
    return np.random.default_rng(seed).integers(0, vocab, size=(1, n), dtype=np.int64)


def _agreement(float_dir: Path, quant_dir: Path, manifest: dict, n: int = 48, seed: int = 0) -> dict:
    """Top-1 agreement and mean |d logprob| of the quantized engine vs the float one on a
    random causal sequence (cheap: one forward each)."""
    import onnxruntime as ort

    from cosine.workers.engine import all_rows

    V, L, Hkv, D = (manifest[k] for k in ("vocab_size", "num_layers", "num_kv_heads", "head_dim"))
    dt = np.float16 if manifest["dtype"] == "float16" else np.float32
    ids = _sample_ids(float_dir, V, n, seed)
    n = ids.shape[1]
    feeds = {"input_ids": ids, "position_ids": np.arange(n, dtype=np.int64)[None],
             "attention_mask": np.tril(np.ones((n, n), bool))[None, None], "logits_index": all_rows(1, n)}
    for i in range(L):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = np.zeros((1, 0, Hkv, D), dt)
    outs = []
    for d in (float_dir, quant_dir):
        s = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        lg = s.run(["logits"], feeds)[0][0].astype(np.float64)
        outs.append(lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True))
        del s
    f, q = outs
    return {"top1_agreement": float((f.argmax(-1) == q.argmax(-1)).mean()),
            "mean_abs_logprob_diff_at_float_top1": float(np.abs(np.take_along_axis(f - q, f.argmax(-1)[:, None], -1)).mean()),
            "positions": n}
