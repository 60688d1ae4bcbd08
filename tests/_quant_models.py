"""Tiny models, calibration data, text and a tokenizer for the quantization tests.

Self-contained (no download, no shared test data): models are built from configs with torch
seeded first, the text is generated from a fixed word list, and the tokenizer is a
``tokenizers`` WordLevel model wrapped in a ``PreTrainedTokenizerFast``. Every block linear's
``in_features`` is a multiple of 64 so group sizes 32/64 and the 2:4 pattern tile every layer.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import models  # tests/models.py (conftest puts tests/ on sys.path)
import torch
import transformers as tf
from torch import nn

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2


# the factories of tests/models.py, at this file's sizes (in_features multiples of 64)
_SIZES = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, max_position_embeddings=128
)


def tiny_llama(
    seed: int = 0, vocab: int = VOCAB, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, **kw: Any
) -> nn.Module:
    return models.tiny_llama(
        seed, vocab=vocab, hidden=hidden, intermediate=intermediate, **{"max_position_embeddings": 128, **kw}
    )


def tiny_qwen2(seed: int = 0, **kw: Any) -> nn.Module:
    return models.tiny_qwen2(seed, **{**_SIZES, **kw})


def tiny_mistral(seed: int = 0, **kw: Any) -> nn.Module:
    return models.tiny_mistral(seed, **{**_SIZES, **kw})


def tiny_opt(seed: int = 0, **kw: Any) -> nn.Module:
    sizes = dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN)
    return models.tiny_opt(seed, **{**sizes, "max_position_embeddings": 128, **kw})


def tiny_gpt2(seed: int = 0, **kw: Any) -> nn.Module:
    """GPT-2: the block layers are transformers ``Conv1D`` (weight stored ``[in, out]``)."""
    return models.tiny_gpt2(
        seed, **{"vocab_size": VOCAB, "n_embd": HIDDEN, "n_inner": INTERMEDIATE, "n_positions": 128, **kw}
    )


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "opt": tiny_opt,
    "gpt2": tiny_gpt2,
}


def calib_ids(n: int = 8, seqlen: int = 32, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Random calibration token ids ``[n, seqlen]``, reproducible."""
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


PROBE = calib_ids(2, 16, seed=123)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The dense ``[out, in]`` float32 weight of a Linear, a GPT-2 Conv1D or a packed llmpress layer."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight(torch.float32)
    w = module.weight.detach().float()
    return w.t() if type(module).__name__ == "Conv1D" else w


def logits(model: nn.Module, ids: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Same state-dict keys, and every tensor identical (dtype, shape and bits)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))
    diff = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


def safetensors_data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus the 8-byte length and header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


# ------------------------------------------------------------------------------ text, tokenizer

_WORDS = " ".join(
    [
        "the a model weight layer small large quant sparse token grid group scale zero point bit",
        "pack row column matrix error hessian order block input output value code mask prune keep",
        "round nearest fast slow data text train test load save file read write is are was has",
        "of to in on for with and or not by from at",
    ]
).split()


def make_text(n_words: int = 3000, seed: int = 0) -> str:
    """Deterministic pseudo-English: sentences of words from a fixed list."""
    rng = random.Random(seed)
    out, line = [], []
    for i in range(n_words):
        line.append(rng.choice(_WORDS))
        if i % 12 == 11:
            out.append(" ".join(line) + " .")
            line = []
    return "\n".join(out) + "\n"


def make_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A WordLevel tokenizer over the word list (ids < 128), trained in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<eos>", "<unk>"], show_progress=False)
    tk.train_from_iterator([make_text(2000, seed=s) for s in range(3)], trainer)
    assert tk.get_vocab_size() <= VOCAB
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )


def save_model_dir(path: Path, model: nn.Module, tokenizer: Any) -> Path:
    """A Hugging Face model folder (config, safetensors, tokenizer), like a Hub download."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def quantized(result: Any) -> dict:
    """The committed quantization state of each quantized layer of a compress run's result."""
    return result.state.quantized
