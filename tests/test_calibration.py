"""Calibration sources (.txt, .jsonl, strings, a local dataset folder, tensors) and windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import DATA_DIR, calib_ids, tiny_llama

import llmpress
from llmpress.engine.calibration import build_calibration, read_documents, sample_windows, tokenize_documents
from llmpress.errors import CalibrationError

CALIB_TXT = DATA_DIR / "calib.txt"


def _stream(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _is_window_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    L = window.numel()
    return any(torch.equal(stream[s : s + L], window) for s in range(stream.numel() - L + 1))


def _docs() -> list[str]:
    paragraphs = [
        p.replace("\n", " ") for p in CALIB_TXT.read_text(encoding="utf-8").split("\n\n") if p.strip()
    ]
    assert len(paragraphs) >= 5
    return paragraphs


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network for ``datasets``: offline flags in the environment and in its loaded config."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    import datasets.config

    for attr in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if hasattr(datasets.config, attr):
            monkeypatch.setattr(datasets.config, attr, True)


# ---------------------------------------------------------------------------------- sources


def test_txt_file_is_one_document() -> None:
    assert read_documents(CALIB_TXT) == [CALIB_TXT.read_text(encoding="utf-8")]
    assert read_documents(str(CALIB_TXT)) == read_documents(CALIB_TXT)


def test_jsonl_file_with_text_field(tmp_path: Path) -> None:
    docs = _docs()
    p = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    p.write_text(
        "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8"
    )  # a blank line
    assert read_documents(p) == docs


def test_jsonl_custom_field_and_plain_strings(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text('{"content": "first doc"}\n"second doc"\n', encoding="utf-8")
    assert read_documents(p, text_field="content") == ["first doc", "second doc"]


def test_list_of_strings_drops_empty_ones() -> None:
    assert read_documents(["a b", "", "   ", "c"]) == ["a b", "c"]
    assert read_documents(("x",)) == ["x"]


def test_local_dataset_folder(tmp_path: Path, offline: None) -> None:
    docs = _docs()
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8"
    )
    assert read_documents(str(folder)) == docs
    assert read_documents(folder, max_documents=2) == docs[:2]
    with pytest.raises(CalibrationError, match="no 'body' column"):
        read_documents(folder, text_field="body")


def test_local_dataset_folder_through_compress(tmp_path: Path, offline: None, tokenizer) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "data.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in _docs()), encoding="utf-8")
    _, report = llmpress.compress(
        tiny_llama(vocab=256),
        {"method": "wanda", "sparsity": 0.5},
        str(folder),
        tokenizer=tokenizer,
        nsamples=4,
        seqlen=16,
        progress=False,
    )
    assert report.calibration == {"nsamples": 4, "seqlen": 16, "seed": 0, "source": str(folder)}
    assert report.overall_sparsity == 0.5


def test_missing_file_and_raw_text_errors(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="does not exist"):
        read_documents(tmp_path / "nope.txt")
    with pytest.raises(CalibrationError, match="pass raw text as a list of strings"):
        read_documents("some raw text\nwith a newline")
    with pytest.raises(CalibrationError, match="holds no text"):
        read_documents(["", "  "])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="holds no text"):
        read_documents(empty)


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": "oops"\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:3: not valid JSON"):
        read_documents(p)
    p.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(
        CalibrationError, match=r"bad\.jsonl:2: expected a string or an object with a 'text' field"
    ):
        read_documents(p)


# ---------------------------------------------------------------------------------- windows


def test_windows_come_from_the_token_stream(tokenizer) -> None:
    ids = build_calibration(tokenizer, CALIB_TXT, nsamples=8, seqlen=32, seed=0)
    assert ids.shape == (8, 32) and ids.dtype == torch.long
    stream = torch.tensor(_stream(tokenizer, CALIB_TXT.read_text(encoding="utf-8")))
    assert all(_is_window_of(w, stream) for w in ids)


def test_same_seed_same_windows_other_seed_differs(tokenizer) -> None:
    a = build_calibration(tokenizer, CALIB_TXT, nsamples=8, seqlen=32, seed=0)
    b = build_calibration(tokenizer, CALIB_TXT, nsamples=8, seqlen=32, seed=0)
    c = build_calibration(tokenizer, CALIB_TXT, nsamples=8, seqlen=32, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the seed is local: the global RNG neither matters nor moves
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(build_calibration(tokenizer, CALIB_TXT, nsamples=8, seqlen=32, seed=0), a)
    assert torch.equal(torch.get_rng_state(), state)


def test_sources_agree(tmp_path: Path, tokenizer) -> None:
    """The same documents as .jsonl, as a list and as a single-document .txt give the same ids."""
    docs = _docs()
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    from_jsonl = build_calibration(tokenizer, p, nsamples=6, seqlen=24, seed=5)
    from_list = build_calibration(tokenizer, docs, nsamples=6, seqlen=24, seed=5)
    assert torch.equal(from_jsonl, from_list)
    one = tmp_path / "one.txt"
    one.write_text(docs[0], encoding="utf-8")
    assert torch.equal(
        build_calibration(tokenizer, one, nsamples=3, seqlen=8, seed=5),
        build_calibration(tokenizer, [docs[0]], nsamples=3, seqlen=8, seed=5),
    )


def test_documents_joined_by_eos(tokenizer) -> None:
    stream = tokenize_documents(tokenizer, ["hello world", "the river"])
    a, b = _stream(tokenizer, "hello world"), _stream(tokenizer, "the river")
    assert stream.tolist() == a + [tokenizer.eos_token_id] + b


def test_tokenizer_without_eos() -> None:
    from llmpress.cli.demo import byte_tokenizer

    tok = byte_tokenizer()
    assert tok.eos_token_id is None
    stream = tokenize_documents(tok, ["ab", "c"])
    assert stream.tolist() == [97, 98, 99]
    ids = build_calibration(tok, CALIB_TXT, nsamples=4, seqlen=64, seed=0)
    assert ids.shape == (4, 64) and int(ids.max()) < 256


def test_too_short_text_is_an_error(tokenizer) -> None:
    with pytest.raises(CalibrationError, match=r"fewer than one window of 4096.*smaller --seqlen"):
        build_calibration(tokenizer, CALIB_TXT, nsamples=2, seqlen=4096)
    with pytest.raises(CalibrationError, match="fewer than one window"):
        build_calibration(tokenizer, ["short text"], nsamples=2, seqlen=64)
    with pytest.raises(CalibrationError, match="need nsamples >= 1 and seqlen >= 2"):
        sample_windows(torch.arange(100), 0, 16)


def test_exact_length_text_gives_the_whole_stream() -> None:
    stream = torch.arange(16)
    assert torch.equal(sample_windows(stream, 3, 16), stream.expand(3, 16))


def test_token_tensors() -> None:
    ids = calib_ids(10, 40)
    assert torch.equal(build_calibration(None, ids, nsamples=4, seqlen=16), ids[:4, :16])
    flat = torch.arange(500)
    w = build_calibration(None, flat, nsamples=5, seqlen=20, seed=2)
    assert w.shape == (5, 20)
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 20)) for row in w)
    assert torch.equal(w, build_calibration(None, flat, nsamples=5, seqlen=20, seed=2))


# ------------------------------------------------------------------------- through compress


@pytest.mark.parametrize("source", ["txt", "jsonl", "list"])
def test_compress_with_text_calibration(source: str, tmp_path: Path, tokenizer) -> None:
    if source == "txt":
        calib: object = CALIB_TXT
    elif source == "jsonl":
        calib = tmp_path / "c.jsonl"
        calib.write_text("\n".join(json.dumps({"text": d}) for d in _docs()), encoding="utf-8")
    else:
        calib = _docs()
    model, report = llmpress.compress(
        tiny_llama(vocab=256),
        {"method": "wanda", "sparsity": 0.5},
        calib,
        tokenizer=tokenizer,
        nsamples=8,
        seqlen=32,
        seed=0,
        progress=False,
    )
    assert report.calibration["nsamples"] == 8 and report.calibration["seqlen"] == 32
    assert report.overall_sparsity == 0.5
    if source != "list":
        assert report.calibration["source"] == str(calib)


def test_compress_seed_reproducible(tokenizer) -> None:
    def masks(seed: int) -> list[torch.Tensor]:
        m, _ = llmpress.compress(
            tiny_llama(vocab=256),
            {"method": "wanda", "sparsity": 0.5},
            CALIB_TXT,
            tokenizer=tokenizer,
            nsamples=4,
            seqlen=16,
            seed=seed,
            progress=False,
        )
        return [p == 0 for n, p in m.state_dict().items() if "layers" in n and n.endswith("proj.weight")]

    a, b, c = masks(0), masks(0), masks(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_compress_short_calibration_text_fails_before_pruning(tokenizer) -> None:
    model = tiny_llama(vocab=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match="fewer than one window"):
        llmpress.compress(
            model,
            {"method": "wanda", "sparsity": 0.5},
            ["too short"],
            tokenizer=tokenizer,
            nsamples=4,
            seqlen=64,
            progress=False,
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
