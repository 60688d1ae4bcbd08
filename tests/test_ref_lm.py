"""Quality on the reference model ``../shared/ref-lm/pycoder-19m`` (skipped when it is absent).

Figures from the ref-lm README, on the first 49,664 tokens of ``eval.txt`` in windows of 512:
dense 2.780; 50 % magnitude pruning per output row (stable tie-breaking) 4.417.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llmpress
from llmpress.cli.evaluate import perplexity_of_windows
from llmpress.engine.calibration import build_calibration

REF = Path(__file__).resolve().parents[1].parent / "shared" / "ref-lm"
MODEL = REF / "pycoder-19m"
N_TOKENS, SEQLEN = 49_664, 512
DENSE_PPL, MAGNITUDE_PPL = 2.780, 4.417

pytestmark = pytest.mark.xdist_group("ref_lm")


@pytest.fixture(scope="module")
def ref() -> dict:
    if not (MODEL / "config.json").is_file() or not (REF / "eval.txt").is_file():
        pytest.skip(f"reference model not found at {REF}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    # a prefix of the text is plenty for 49,664 tokens (~3.4 characters per token)
    text = (REF / "eval.txt").read_text(encoding="utf-8")[: 8 * N_TOKENS]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > N_TOKENS
    windows = torch.tensor(ids[:N_TOKENS]).view(-1, SEQLEN)  # [97, 512]
    return {"tok": tok, "windows": windows}


def _model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def _ppl(model, ref: dict) -> float:
    res = perplexity_of_windows(model, ref["windows"], batch_size=8)
    assert res["windows"] == 97 and res["tokens"] == 97 * 511
    return res["perplexity"]


def test_dense_perplexity(ref: dict) -> None:
    assert _ppl(_model(), ref) == pytest.approx(DENSE_PPL, abs=0.005)


def test_magnitude_row_perplexity_matches_the_readme(ref: dict) -> None:
    model, report = llmpress.compress(
        _model(), {"method": "magnitude", "sparsity": 0.5, "group": "row"}, progress=False
    )
    assert len(report.modules) == 8 * 7
    assert all(m.sparsity == 0.5 for m in report.modules.values())
    assert _ppl(model, ref) == pytest.approx(MAGNITUDE_PPL, abs=0.01)


@pytest.mark.slow
def test_wanda_and_sparsegpt_quality(ref: dict) -> None:
    """Wanda lands between dense and magnitude; SparseGPT below Wanda (16 x 256 calibration tokens)."""
    calib = build_calibration(ref["tok"], REF / "calib.txt", nsamples=16, seqlen=256, seed=0)
    ppl = {}
    for method in ("wanda", "sparsegpt"):
        model, report = llmpress.compress(
            _model(), {"method": method, "sparsity": 0.5}, calib, progress=False
        )
        assert report.overall_sparsity == pytest.approx(0.5, abs=1e-3)
        ppl[method] = _ppl(model, ref)
    assert DENSE_PPL < ppl["wanda"] < MAGNITUDE_PPL, ppl
    assert ppl["sparsegpt"] < ppl["wanda"], ppl
