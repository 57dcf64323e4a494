"""cosine-distill on tiny models: LoRA merge is exact, the CLI trains / checkpoints /
resumes / exports an engine the worker runtime loads, and distillation raises the
drafter's agreement with the target."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cosine import distill  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from old oak trees "
         "near quiet rivers and tall green hills under a pale moon").split()
PROGRESS = re.compile(r"step (\d+)/(\d+)\s+loss ([\d.]+)\s+acc [\d.]+\s+lr \S+\s+\d+ tok/s\s+elapsed \S+\s+ETA \S+")


def _text(n_lines: int, seed: int) -> str:
    rnd = random.Random(seed)
    return "\n".join(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 14))).capitalize() + "."
                     for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """target: llama seed 0 (hidden 64); base: llama seed 1, hidden 32 (same 64-id vocab);
    a `cosine datasets build`-shaped corpus (train/prose.txt + heldout.json) and a plain one."""
    from cosine.export.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("distill")
    ds = root / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "train" / "prose.txt").write_text(_text(300, 0))
    held = [" " + _text(3, 100 + i).replace("\n", " ")[:60] for i in range(6)]
    (ds / "heldout.json").write_text(json.dumps({"prose": held, "code": ["x = 1"]}))
    (root / "plain.txt").write_text(_text(400, 1))
    return {"target": make_tiny_model(root / "target", arch="llama", seed=0),
            "base": make_tiny_model(root / "base", arch="llama", seed=1, hidden=32),
            "train": ds / "train" / "prose.txt", "plain": root / "plain.txt", "root": root}


def _common(p: dict[str, Path], out: Path) -> list[str]:
    return ["--target", str(p["target"]), "--base", str(p["base"]), "--corpus", str(p["train"]), "--out", str(out),
            "--windows", "32", "--prompt-tokens", "24", "--continuation-tokens", "12", "--batch-size", "4",
            "--eval-tokens", "16", "--lora-rank", "4", "--threads", "1"]


def _cli(args: list[str], module: str = "cosine.distill") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def _steps(stderr: str) -> list[int]:
    return [int(m.group(1)) for m in PROGRESS.finditer(stderr)]


# ----- LoRA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,wrapped", [("llama", 14), ("qwen2", 14), ("gpt2", 8)])
def test_lora_merge_equals_base_plus_adapter(tmp_path: Path, arch: str, wrapped: int) -> None:
    from cosine.export.build import _Source
    from cosine.export.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / arch, arch=arch, seed=3)
    model = _Source(path).load_model(progress=False)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        torch.manual_seed(0)
        mods = distill.add_lora(model, rank=4, alpha=8)
        assert len(mods) == wrapped
        assert torch.equal(model(ids).logits, ref)  # B = 0: a fresh adapter changes nothing
        for m in mods.values():
            m.lora_B.normal_(std=0.05, generator=torch.Generator().manual_seed(len(m.lora_B)))
        with_lora = model(ids).logits
        assert (with_lora - ref).abs().max() > 1e-2  # the adapter really changes the model
        distill.save_adapter(tmp_path / "a.safetensors", model, {"rank": 4, "alpha": 8.0})
        distill.merge_lora(model)
        assert not distill.lora_modules(model)
        merged = model(ids).logits
    torch.testing.assert_close(merged, with_lora, atol=2e-5, rtol=2e-5)

    # the saved adapter alone, merged into a fresh copy of the base, gives the same model
    fresh = _Source(path).load_model(progress=False)
    sd, meta = distill.read_adapter(tmp_path / "a.safetensors")
    assert meta["rank"] == 4
    distill.add_lora(fresh, 4, 8)
    distill.load_lora_state(fresh, sd)
    with torch.no_grad():
        torch.testing.assert_close(distill.merge_lora(fresh)(ids).logits, with_lora, atol=2e-5, rtol=2e-5)


def test_lora_last_layers_and_bad_adapter(tiny_pair: dict[str, Path]) -> None:
    from cosine.export.build import _Source

    model = _Source(tiny_pair["base"]).load_model(progress=False)
    mods = distill.add_lora(model, rank=2, last_layers=1)
    assert len(mods) == 7 and all(".layers.1." in n for n in mods)
    other = _Source(tiny_pair["base"]).load_model(progress=False)
    distill.add_lora(other, rank=2)
    with pytest.raises(distill.DistillError, match="does not fit"):
        distill.load_lora_state(other, distill.lora_state(model))


# ----- acceptance simulation ---------------------------------------------------------------

def test_simulated_acceptance_counts_rounds() -> None:
    T, F = True, False
    # rounds: 2 accepted + bonus (3), 4 accepted + bonus (5), 0 + bonus (1)
    r = distill.simulate_acceptance([np.array([T, T, F, T, T, T, T, T, F])], k=4)
    assert r["rounds"] == 3 and r["mean_accepted_length"] == 3.0 and r["mean_accepted_drafts"] == 2.0
    assert r["accept_rate_by_depth"] == [round(2 / 3, 4), round(2 / 3, 4), round(1 / 3, 4), round(1 / 3, 4)]
    # k = 1: every round is one draft; a perfect drafter commits 2 tokens a round (last round truncated)
    assert distill.simulate_acceptance([np.ones(5, bool)], k=1)["mean_accepted_length"] == 5 / 3
    assert distill.simulate_acceptance([np.zeros(4, bool)], k=4)["mean_accepted_length"] == 1.0
    rep = distill.acceptance_report([np.array([1, 2, 9, 4])], [np.array([1, 2, 3, 4])], k=2)
    assert rep["top1_agreement"] == 0.75 and rep["agreement_by_position"] == [1.0, 1.0, 0.0, 1.0]


# ----- the command --------------------------------------------------------------------------

def test_cli_trains_checkpoints_resumes_and_exports(tiny_pair: dict[str, Path], tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    from cosine.workers.engine import Engine

    out = tmp_path / "out"
    common = _common(tiny_pair, out) + ["--steps", "6", "--save-every", "2", "--log-every", "1"]

    # run 1 ends after 3 of 6 steps (as a time-boxed GPU lease would), with a checkpoint
    r1 = _cli(common + ["--stop-after", "3"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert _steps(r1.stderr) == [1, 2, 3], r1.stderr[-3000:]
    assert "teacher 1/2 batches" in r1.stderr and "teacher held-out" in r1.stderr
    summary = json.loads(r1.stdout.strip().splitlines()[-1])
    assert summary["finished"] is False and summary["stopped_at_step"] == 3
    ck = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ck == ["step-000002", "step-000003"], ck
    for name in ("adapter.safetensors", "optimizer.pt", "state.json"):
        assert (out / "checkpoints" / "step-000003" / name).is_file()
    assert json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())["step"] == 3
    assert not (out / "engine").exists()

    # run 2 resumes at step 4 (not 1), reuses the teacher cache, then merges and exports
    r2 = _cli(common + ["--resume"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "continuing at step 4 of 6" in r2.stderr
    assert _steps(r2.stderr) == [4, 5, 6], r2.stderr[-3000:]
    assert "teacher data: cached" in r2.stderr and "teacher 1/2" not in r2.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["finished"] is True
    assert rep["training"]["resumed_from"] == 3 and rep["training"]["steps_this_run"] == 3
    assert [h[0] for h in rep["training"]["history"]] == [1, 2, 3, 4, 5, 6]
    assert "heldout.json [prose]" in rep["heldout"]["source"] and rep["heldout"]["prompts"] == 6
    acc = rep["acceptance"]
    for w in ("before", "after", "after_engine"):
        assert acc[w]["prompts"] == 6 and acc[w]["tokens"] == 6 * 16
        assert 0 <= acc[w]["top1_agreement"] <= 1 and 1 <= acc[w]["mean_accepted_length"] <= 5
        assert len(acc[w]["accept_rate_by_depth"]) == 4
    assert abs(acc["after_engine"]["top1_agreement"] - acc["after"]["top1_agreement"]) <= 0.02
    assert rep["engine"]["parity_passed"] is True
    adapter = out / "adapter.safetensors"
    assert adapter.stat().st_size < 0.5 * sum(f.stat().st_size for f in (out / "hf").glob("*.safetensors"))

    eng = Engine(out / "engine", threads=1)
    ids = np.array([[5, 9, 2, 7, 30]], np.int64)
    mask = np.tril(np.ones((5, 5), bool))[None, None]
    logits, _, _ = eng.forward(ids, np.arange(5)[None], mask, eng.empty_past())
    assert logits.shape == (1, 5, 64) and np.isfinite(logits).all()

    # the resumed adapter equals an uninterrupted 6-step run's (data order, optimizer, schedule)
    straight = tmp_path / "straight"
    args = _common(tiny_pair, straight) + ["--steps", "6", "--save-every", "0", "--no-export", "--no-eval"]
    assert distill.main(args) == 0
    a, b = load_file(str(adapter)), load_file(str(straight / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)

    # an OUT with checkpoints needs --resume
    capsys.readouterr()
    assert distill.main(common) == 2
    assert "--resume" in capsys.readouterr().err

    # export-only from the adapter alone (through `cosine distill`) rebuilds the same engine
    from cosine.cli import main as cosine_main

    out2 = tmp_path / "out2"
    assert cosine_main(["distill", "--target", str(tiny_pair["target"]), "--base", str(tiny_pair["base"]), "--out",
                        str(out2), "--steps", "0", "--adapter", str(adapter), "--no-eval", "--threads", "1"]) == 0
    eng2 = Engine(out2 / "engine", threads=1)
    logits2, _, _ = eng2.forward(ids, np.arange(5)[None], mask, eng2.empty_past())
    np.testing.assert_allclose(logits2, logits, atol=1e-4)


def test_cli_user_errors(tiny_pair: dict[str, Path], tmp_path: Path, capsys) -> None:
    base = ["--target", str(tiny_pair["target"]), "--base", str(tiny_pair["base"]), "--out", str(tmp_path / "o")]
    for extra, msg in ((["--steps", "5"], "--corpus is required"),
                       (["--steps", "5", "--adapter", "x", "--corpus", str(tiny_pair["plain"])], "--steps 0"),
                       (["--steps", "0", "--adapter", str(tmp_path / "none.safetensors"), "--no-eval"],
                        "does not exist"),
                       (["--steps", "5", "--corpus", str(tmp_path / "no-such-corpus.txt")], "not found")):
        capsys.readouterr()
        assert distill.main(base + extra) == 2
        assert msg in capsys.readouterr().err
    capsys.readouterr()
    assert distill.main(["--target", "no-such-model", "--base", str(tiny_pair["base"]), "--out",
                         str(tmp_path / "o"), "--corpus", str(tiny_pair["plain"])]) == 2
    assert "neither a known model name" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_distillation_raises_agreement_with_the_target(tiny_pair: dict[str, Path], tmp_path: Path, loss: str) -> None:
    out = tmp_path / f"improve-{loss}"
    args = ["--target", str(tiny_pair["target"]), "--base", str(tiny_pair["base"]), "--corpus",
            str(tiny_pair["plain"]), "--out", str(out), "--steps", "100", "--batch-size", "8", "--lr", "3e-3",
            "--windows", "128", "--prompt-tokens", "32", "--continuation-tokens", "16", "--loss", loss,
            "--eval-prompts", "8", "--eval-prompt-tokens", "32", "--eval-tokens", "32", "--save-every", "0",
            "--no-export", "--threads", "1", "--seed", "0"]
    assert distill.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["heldout"]["source"].startswith("corpus tail")
    before, after = rep["acceptance"]["before"], rep["acceptance"]["after"]
    hist = rep["training"]["history"]
    assert hist[-1][1] < 0.8 * hist[0][1], hist  # the loss falls
    # the random base agrees with the random target on ~1/64 of the tokens; the distilled one on far more
    assert before["top1_agreement"] < 0.05
    assert after["top1_agreement"] >= before["top1_agreement"] + 0.12, (before, after)
    assert after["mean_accepted_length"] >= before["mean_accepted_length"] + 0.12, (before, after)
