"""Small helpers for building an ONNX graph node by node, with weights streamed to disk.

Weights go straight into ``model.onnx.data`` as they are added (one tensor in memory at
a time); the ModelProto only holds references to offsets in that file. This is what
keeps exporting a multi-GB model from needing a second full copy of the weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # the plain graph's opset
FUSED_OPSET = 23  # Attention, RotaryEmbedding (standard ops since opset 23)
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (MatMulNBits, SkipSimplifiedLayerNormalization)
COSINE_DOMAIN = "cosine"  # cosine's own operators (GGUFMatMul: workers/kernels)
DATA_FILE = "model.onnx.data"
_ALIGN = 4096  # page-aligned offsets let ONNX Runtime memory-map the weights

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL,
               np.dtype(np.uint8): TensorProto.UINT8}


def onnx_dtype(dtype: Any) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


class GraphBuilder:
    """Accumulates nodes, inline constants and external weights for one graph.

    ``dtype`` is the model (weight / activation / KV) dtype; float32 islands (norms,
    softmax, logits) are made explicit with ``to_float`` / ``to_model``.
    """

    def __init__(self, out_dir: Path, dtype: str = "float32", opset: int = OPSET) -> None:
        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.memo: dict[tuple, str] = {}  # values computed once per graph (block sums of an input)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._consts: dict[tuple, str] = {}
        self._names: set[str] = set()
        self._counter = 0
        self._data: BinaryIO | None = open(self.out_dir / DATA_FILE, "wb")
        self.bytes_written = 0

    # --- naming -----------------------------------------------------------------------------

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        name = f"{hint}_{self._counter}"
        self._names.add(name)
        return name

    # --- tensors ----------------------------------------------------------------------------

    def weight(self, name: str, array: np.ndarray, dtype: Any | None = None) -> str:
        """Write ``array`` (cast to ``dtype`` or the model dtype) to the data file now."""
        if self._data is None:
            raise RuntimeError("graph already finalized")
        a = np.ascontiguousarray(array, dtype=self.dtype if dtype is None else dtype)
        pad = (-self._data.tell()) % _ALIGN
        if pad:
            self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(a.tobytes(order="C"))  # one tensor's bytes at a time
        t = TensorProto()
        t.name = name
        t.data_type = onnx_dtype(a.dtype)
        t.dims.extend(a.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(a.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.initializers.append(t)
        self.bytes_written += a.nbytes
        return name

    def const(self, value: Any, dtype: Any) -> str:
        """A small inline constant (shapes, axes, scalars), de-duplicated."""
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = self._fresh("const")
            self.initializers.append(numpy_helper.from_array(a, name))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, value: Any) -> str:
        return self.const(value, np.int64)

    def f32(self, value: float) -> str:
        return self.const(value, np.float32)

    def scalar(self, value: float) -> str:
        """A scalar in the model dtype."""
        return self.const(value, self.dtype)

    # --- nodes ------------------------------------------------------------------------------

    def op(self, op_type: str, inputs: Sequence[str], name: str | None = None, outputs: int = 1,
           domain: str = "", **attrs: Any) -> Any:
        """Append a node; returns its output name (or a list when ``outputs > 1``). An
        empty input name is an omitted optional input."""
        if name is not None and outputs == 1:
            outs = [name]
        else:
            outs = [self._fresh(f"{name or op_type.lower()}{'' if outputs == 1 else f'_o{i}'}")
                    for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._fresh(op_type), domain=domain,
                                           **attrs))
        return outs[0] if outputs == 1 else outs

    def to_float(self, x: str) -> str:
        return x if self.dtype == np.float32 else self.op("Cast", [x], to=TensorProto.FLOAT)

    def to_model(self, x: str, name: str | None = None) -> str:
        if self.dtype == np.float32:
            return self.op("Identity", [x], name=name) if name else x
        return self.op("Cast", [x], name=name, to=onnx_dtype(self.dtype))

    def linear(self, x: str, w_in_out: str, bias: str | None = None) -> str:
        y = self.op("MatMul", [x, w_in_out])
        return self.op("Add", [y, bias]) if bias else y

    # --- interface ----------------------------------------------------------------------------

    def add_input(self, name: str, dtype: Any, shape: Sequence[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def add_output(self, name: str, dtype: Any, shape: Sequence[Any]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def close(self) -> None:
        if self._data is not None:
            self._data.flush()
            os.fsync(self._data.fileno())
            self._data.close()
            self._data = None

    def save(self, graph_name: str, metadata: dict[str, str] | None = None) -> Path:
        """Write model.onnx next to the (already written) data file and check it."""
        self.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        for domain in (MS_DOMAIN, COSINE_DOMAIN):
            if any(n.domain == domain for n in self.nodes):
                opsets.append(helper.make_opsetid(domain, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="cosine-export")
        # opset 17: IR 8, read by every onnxruntime >= 1.14; opset 23: IR 10 (onnxruntime >= 1.22)
        model.ir_version = 8 if self.opset <= 17 else 10
        for k, v in (metadata or {}).items():
            p = model.metadata_props.add()
            p.key, p.value = k, str(v)
        path = self.out_dir / "model.onnx"
        # The initializers carry no bytes (they are EXTERNAL), so this proto stays small.
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        onnx.checker.check_model(str(path))  # by path: also resolves the external data file
        return path
