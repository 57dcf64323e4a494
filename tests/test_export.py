"""cosine.export: graph parity with PyTorch, the engine interface, errors and the CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")

import onnx  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from cosine.export import ExportError, ParityError, UnsupportedArchitecture  # noqa: E402
from cosine.export.build import export_engine  # noqa: E402
from cosine.keyslots import with_slots  # noqa: E402
from cosine.workers.engine import all_rows  # noqa: E402
from cosine.export.cli import main as cli_main  # noqa: E402
from cosine.export.parity import check_parity  # noqa: E402
from cosine.export.runtime import session  # noqa: E402
from cosine.export.tiny import make_tiny_model  # noqa: E402
from cosine.tree import ancestor_mask, path_to, position_ids  # noqa: E402

ARCHS = ("llama", "qwen2", "gpt2")
MANIFEST_FIELDS = ("format", "format_version", "exporter_version", "name", "architecture", "source",
                   "source_sha256", "dtype", "opset", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                   "hidden_size", "vocab_size", "max_positions", "eos_token_ids", "bos_token_id", "inputs",
                   "outputs", "parity", "providers_built", "created")


@pytest.fixture(scope="module")
def engines(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-engines")
    for arch in ARCHS:
        export_engine(tiny_models[arch], root / arch, progress=False)
    return {arch: root / arch for arch in ARCHS}


def _manifest(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())


def _run(sess, manifest: dict, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, past=None, rows=None):
    """One engine call (logits of ``rows`` [B, K], default every new token); returns
    (logits, [new K], [new V])."""
    L, Hkv, D = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]
    B = ids.shape[0]
    if past is None:
        z = np.zeros((B, Hkv, 0, D), np.dtype(manifest["dtype"]))
        past = [(z, z)] * L
    feeds = {"input_ids": ids.astype(np.int64), "position_ids": pos.astype(np.int64),
             "attention_mask": mask.astype(bool),
             "logits_index": all_rows(B, ids.shape[1]) if rows is None else rows.astype(np.int64)}
    for i, (k, v) in enumerate(past):
        feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = k, v
    outs = sess.run(None, with_slots(sess, feeds))
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, outs))
    return got["logits"], [got[f"new_key.{i}"] for i in range(L)], [got[f"new_value.{i}"] for i in range(L)]


def _causal(T: int) -> np.ndarray:
    return np.tril(np.ones((T, T), bool))[None, None]


# ----- parity and manifest -----------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_parity_passes_fp32(engines: dict[str, Path], arch: str) -> None:
    p = _manifest(engines[arch])["parity"]
    assert p["passed"] is True and p["argmax_match"] is True
    assert p["tolerance"] == 1e-4 and p["max_abs_logprob_diff"] < 1e-4
    assert p["prefix_len"] == 12 and p["tree_nodes"] == 10 and p["batch_prefix_lens"] == [12, 7]


@pytest.mark.parametrize("arch", ARCHS)
def test_manifest_fields(engines: dict[str, Path], tiny_models: dict[str, Path], arch: str) -> None:
    m = _manifest(engines[arch])
    assert set(MANIFEST_FIELDS) <= set(m)
    assert m["format"] == "cosine-engine" and m["format_version"] == 3 and m["kv_layout"] == "heads-major"
    assert (m["graph"], m["opset"]) == (("plain", 17) if arch == "gpt2" else ("fused", 23))
    assert m["dtype"] == "float32" and m["quantization"] is None
    assert m["architecture"] == ("gpt2" if arch == "gpt2" else "llama") and m["model_type"] == arch
    assert (m["num_layers"], m["vocab_size"], m["hidden_size"], m["max_positions"]) == (2, 64, 64, 256)
    assert m["num_kv_heads"] == (4 if arch == "gpt2" else 2) and m["head_dim"] == 16
    assert m["eos_token_ids"] == [0] and m["bos_token_id"] == 1
    import hashlib
    assert m["source_sha256"] == hashlib.sha256((tiny_models[arch] / "model.safetensors").read_bytes()).hexdigest()
    assert [i["name"] for i in m["inputs"]][:4] == ["input_ids", "position_ids", "attention_mask", "logits_index"]
    assert len(m["outputs"]) == 1 + 2 * m["num_layers"]
    for f in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        assert (engines[arch] / f).is_file()


def test_graph_interface_matches_design(engines: dict[str, Path]) -> None:
    model = onnx.load(str(engines["llama"] / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(str(engines["llama"] / "model.onnx"))
    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}
    assert ins["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert ins["attention_mask"].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert ins["logits_index"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    dims = [d.dim_value or d.dim_param for d in ins["past_key.1"].type.tensor_type.shape.dim]
    assert dims == ["batch", 2, "past", 16]  # heads-major cache
    assert outs["logits"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert set(outs) == {"logits", "new_key.0", "new_key.1", "new_value.0", "new_value.1"}
    # every weight lives in the external data file
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 256]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_index_computes_only_the_asked_rows(engines: dict[str, Path], arch: str) -> None:
    """logits_index picks, per batch row, which new tokens get logits: a right-padded batch
    asking for each request's last rows gets exactly those rows of the full run, and the
    new K/V (every token) are unchanged."""
    from cosine.export.runtime import session

    m = _manifest(engines[arch])
    sess = session(engines[arch], "cpu")
    rng = np.random.default_rng(3)
    T, lens = 6, (6, 4)
    ids = rng.integers(2, m["vocab_size"], (2, T))
    mask = np.zeros((2, 1, T, T), bool)
    for b, t in enumerate(lens):
        mask[b, 0, :t, :t] = np.tril(np.ones((t, t), bool))
        mask[b, 0, np.arange(t, T), np.arange(t, T)] = True  # padding rows see themselves
    pos = np.tile(np.arange(T), (2, 1))
    full, k_full, v_full = _run(sess, m, ids, pos, mask)
    rows = np.array([[4, 5], [2, 3]])  # the last two real tokens of each request
    some, k_some, v_some = _run(sess, m, ids, pos, mask, rows=rows)
    assert some.shape == (2, 2, m["vocab_size"])
    np.testing.assert_allclose(some[0], full[0, 4:6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(some[1], full[1, 2:4], rtol=1e-5, atol=1e-5)
    for a, b in zip(k_full + v_full, k_some + v_some):
        np.testing.assert_array_equal(a, b)


def test_tokenizer_copied(engines: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(engines["qwen2"] / "tokenizer.json"))
    assert tok.get_vocab_size() == 64
    ids = tok.encode("hello world").ids
    assert len(ids) == 11 and tok.decode(ids) == "hello world"


def test_mistral_with_explicit_head_dim(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """Mistral = llama family; head_dim != hidden/heads (as in Mistral-Nemo) must be honoured."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                        sliding_window=4096, initializer_range=0.2)
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(ExportError, match="could not build a fast tokenizer"):  # before any weight work
        export_engine(tmp_path / "hf", tmp_path / "e", progress=False)
    shutil.copy(tiny_models["llama"] / "tokenizer.json", tmp_path / "hf")
    m = export_engine(tmp_path / "hf", tmp_path / "e", progress=False)
    assert m["parity"]["passed"] and m["model_type"] == "mistral" and m["architecture"] == "llama"
    assert (m["num_heads"], m["num_kv_heads"], m["head_dim"], m["sliding_window"]) == (4, 1, 16, 4096)


# ----- the engine interface, checked directly --------------------------------------------

@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_kv_path_equals_full_recompute(engines: dict[str, Path], arch: str) -> None:
    """prefix (P=0) then a tree with the prefix K/V as past == each root-to-node path
    recomputed from scratch through the same engine."""
    m = _manifest(engines[arch])
    sess = session(engines[arch])
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, 64, 9)
    parents = np.array([-1, 0, 0, 1, 1, 3, 2, 6])
    tokens = rng.integers(0, 64, parents.size)
    P, N = prefix.size, parents.size
    _, ks, vs = _run(sess, m, prefix[None], np.arange(P)[None], _causal(P))
    mask = np.concatenate([np.ones((N, P), bool), ancestor_mask(parents)], axis=1)[None, None]
    tree_logits, _, _ = _run(sess, m, tokens[None], position_ids(parents, P)[None], mask, list(zip(ks, vs)))
    for u in range(N):
        seq = np.concatenate([prefix, tokens[path_to(parents, u)]])
        full, _, _ = _run(sess, m, seq[None], np.arange(seq.size)[None], _causal(seq.size))
        np.testing.assert_allclose(tree_logits[0, u], full[0, -1], atol=2e-5, rtol=1e-5)


def test_batch_with_left_padding_equals_single_rows(engines: dict[str, Path]) -> None:
    m = _manifest(engines["qwen2"])
    sess = session(engines["qwen2"])
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 64, 10), rng.integers(0, 64, 4)
    P = a.size
    ids = np.zeros((2, P), np.int64)
    ids[0], ids[1, P - b.size:] = a, b
    pos = np.zeros((2, P), np.int64)
    pos[0], pos[1, P - b.size:] = np.arange(P), np.arange(b.size)
    valid = np.ones((2, P), bool)
    valid[1, :P - b.size] = False
    mask = (np.tril(np.ones((P, P), bool))[None] & valid[:, None]) | np.eye(P, dtype=bool)[None]
    logits, ks, vs = _run(sess, m, ids, pos, mask[:, None])
    la, ka, _ = _run(sess, m, a[None], np.arange(P)[None], _causal(P))
    lb, kb, _ = _run(sess, m, b[None], np.arange(b.size)[None], _causal(b.size))
    np.testing.assert_allclose(logits[0], la[0], atol=1e-5)
    np.testing.assert_allclose(logits[1, P - b.size:], lb[0], atol=1e-5)
    np.testing.assert_allclose(ks[1][1, :, P - b.size:], kb[1][0], atol=1e-5)
    # one decode step for both rows over the padded cache
    nxt = np.array([[5], [7]])
    mask2 = np.concatenate([valid, np.ones((2, 1), bool)], axis=1)[:, None, None]
    step, _, _ = _run(sess, m, nxt, np.array([[P], [b.size]]), mask2, list(zip(ks, vs)))
    ref_a, _, _ = _run(sess, m, np.append(a, 5)[None], np.arange(P + 1)[None], _causal(P + 1))
    ref_b, _, _ = _run(sess, m, np.append(b, 7)[None], np.arange(b.size + 1)[None], _causal(b.size + 1))
    np.testing.assert_allclose(step[0, 0], ref_a[0, -1], atol=1e-5)
    np.testing.assert_allclose(step[1, 0], ref_b[0, -1], atol=1e-5)


def test_new_key_is_hf_key_after_rope(engines: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    m = _manifest(engines["llama"])
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ids = np.arange(3, 11)[None]
    _, ks, vs = _run(session(engines["llama"]), m, ids, np.arange(8)[None], _causal(8))
    with torch.no_grad():
        cache = hf(input_ids=torch.as_tensor(ids), use_cache=True).past_key_values
    for i in range(m["num_layers"]):
        k_ref = cache.layers[i].keys[0].numpy()  # [Hkv, T, D], as the engine's heads-major new K
        v_ref = cache.layers[i].values[0].numpy()
        np.testing.assert_allclose(ks[i][0], k_ref, atol=1e-5)
        np.testing.assert_allclose(vs[i][0], v_ref, atol=1e-5)


# ----- parity cannot pass silently -----------------------------------------------------------

def test_corrupted_weights_fail_parity(engines: dict[str, Path], tiny_models: dict[str, Path],
                                       tmp_path: Path) -> None:
    eng = tmp_path / "corrupt"
    shutil.copytree(engines["llama"], eng)
    m = _manifest(eng)
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    assert check_parity(eng, hf, m)["passed"] is True
    model = onnx.load(str(eng / "model.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == "model.layers.1.mlp.down_proj.weight")
    meta = {e.key: e.value for e in t.external_data}
    off = int(meta["offset"])
    with open(eng / "model.onnx.data", "r+b") as f:  # scale a 16-float run of one weight by 1.05
        f.seek(off + 4 * 100)
        w = np.frombuffer(f.read(64), np.float32) * 1.05
        f.seek(off + 4 * 100)
        f.write(w.astype(np.float32).tobytes())
    res = check_parity(eng, hf, m)
    assert res["passed"] is False and res["max_abs_logprob_diff"] > 1e-4


def test_parity_failure_raises_and_leaves_no_manifest(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="parity FAILED"):
        export_engine(tiny_models["gpt2"], tmp_path / "e", progress=False, parity_tolerance=1e-12)
    assert not (tmp_path / "e" / "manifest.json").exists()
    assert json.loads((tmp_path / "e" / "parity_failed.json").read_text())["passed"] is False


def _weight_bytes(engine: Path) -> int:
    model = onnx.load(str(engine / "model.onnx"), load_external_data=False)
    return sum(int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "length")


@pytest.mark.parametrize("graph", ["fused", "plain"])
def test_float16_engine_is_valid_and_close(engines: dict[str, Path], tiny_models: dict[str, Path],
                                          tmp_path: Path, graph: str) -> None:
    """float16 engines (the GPU's) have their parity checked here: onnxruntime 1.32's CPU
    provider runs every op of both graphs in float16."""
    m = export_engine(tiny_models["llama"], tmp_path / "fp16", dtype="float16", progress=False, graph=graph)
    onnx.checker.check_model(str(tmp_path / "fp16" / "model.onnx"), full_check=True)
    assert m["dtype"] == "float16" and m["graph"] == graph
    if graph == "fused":
        assert _weight_bytes(tmp_path / "fp16") * 2 == _weight_bytes(engines["llama"])
    p = m["parity"]
    assert p["passed"] and p["tolerance"] == 1e-2 and p["provider"] == "cpu"


# ----- tiny models -----------------------------------------------------------------------------

def test_tiny_model_is_deterministic_and_not_flat(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", "llama", seed=5)
    b = make_tiny_model(tmp_path / "b", "llama", seed=5)
    c = make_tiny_model(tmp_path / "c", "llama", seed=6)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)
    hf = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.arange(3, 40)[None]).logits[0]
    assert len(set(logits.argmax(-1).tolist())) >= 5  # greedy choices vary with context
    assert float(torch.log_softmax(logits, -1).max(-1).values.mean()) > -3.0  # well above uniform (-4.16)


# ----- errors ------------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_engine(tmp_path / "nope", tmp_path / "out")


def test_dir_without_config_or_weights(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export_engine(tmp_path / "empty", tmp_path / "out")
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", d)
    with pytest.raises(ExportError, match="has no weights"):
        export_engine(d, tmp_path / "out")


def test_bad_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ExportError, match="not a GGUF file"):
        export_engine(bad, tmp_path / "out")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(ExportError, match="could not read"):
        export_engine(trunc, tmp_path / "out")


def test_out_dir_not_writable(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="not writable"):
        export_engine(tiny_models["llama"], blocker / "engine")


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(d)
    with pytest.raises(UnsupportedArchitecture,
                       match="unsupported architecture bert; supported: llama, mistral, qwen2, gpt2"):
        export_engine(d, tmp_path / "out")


def test_rope_scaling_is_rejected(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "scaled"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    cfg.pop("rope_scaling", None)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="rope scaling 'linear' is not supported"):
        export_engine(d, tmp_path / "out")


# ----- CLI ------------------------------------------------------------------------------------------

def test_cli_bad_path_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cosine-export: error: model path") and "does not exist" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_tensorrt_missing_exit_2(tiny_models: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is installed here")
    rc = cli_main(["--model", str(tiny_models["llama"]), "--out", str(tmp_path / "o"), "--provider", "tensorrt"])
    assert rc == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_cli_exports(tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli_main(["--model", str(tiny_models["gpt2"]), "--out", str(tmp_path / "e"), "--name", "g",
                   "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["name"] == "g" and out["parity_passed"] is True
    assert _manifest(tmp_path / "e")["name"] == "g"


# ----- real model (opt-in) ------------------------------------------------------------------------

SMOLLM = Path.home() / ".cache" / "cosine" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.real_models
@pytest.mark.skipif(os.environ.get("COSINE_REAL_MODELS") != "1" or not SMOLLM.is_file(),
                    reason=f"needs COSINE_REAL_MODELS=1 and {SMOLLM}")
def test_smollm2_gguf_parity(tmp_path: Path) -> None:
    m = export_engine(SMOLLM, tmp_path / "smollm2", progress=False)
    assert m["architecture"] == "llama" and m["parity"]["passed"] is True
    assert m["num_layers"] == 30 and m["vocab_size"] == 49152
