"""Tiny random Hugging Face models, calibration ids and a tiny tokenizer for the tests.

Every factory seeds torch itself, so the same call always builds the same weights. Sizes are
tiny (hidden 32, 2 blocks) with every ``in_features`` a multiple of 8, so ``2:4`` and ``4:8``
patterns tile every block linear. No download: models are built from configs, the tokenizer
is trained in-process on the text in ``tests/data``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn

DATA_DIR = Path(__file__).resolve().parent / "data"
VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2


def _build(
    cls: Any, config_cls: Any, defaults: dict[str, Any], overrides: dict[str, Any], seed: int
) -> nn.Module:
    """``cls(config_cls(**defaults, **overrides))`` with torch seeded first (overrides win)."""
    config = config_cls(**{**defaults, **overrides})
    torch.manual_seed(seed)
    return cls(config).eval()


_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    max_position_embeddings=256,
)
_GQA = dict(_COMMON, num_key_value_heads=2, bos_token_id=0, eos_token_id=0)


def tiny_llama(
    seed: int = 0,
    vocab: int = VOCAB,
    hidden: int = HIDDEN,
    intermediate: int = INTERMEDIATE,
    layers: int = LAYERS,
    **kw: Any,
) -> nn.Module:
    defaults = dict(
        _GQA,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return _build(tf.LlamaForCausalLM, tf.LlamaConfig, defaults, kw, seed)


def tiny_qwen2(seed: int = 0, **kw: Any) -> nn.Module:
    return _build(tf.Qwen2ForCausalLM, tf.Qwen2Config, _GQA, kw, seed)


def tiny_mistral(seed: int = 0, **kw: Any) -> nn.Module:
    return _build(tf.MistralForCausalLM, tf.MistralConfig, _GQA, kw, seed)


def tiny_opt(seed: int = 0, **kw: Any) -> nn.Module:
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_dim=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=HIDDEN,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return _build(tf.OPTForCausalLM, tf.OPTConfig, defaults, kw, seed)


def tiny_gpt2(seed: int = 0, **kw: Any) -> nn.Module:
    """GPT-2: its block layers are transformers ``Conv1D`` with weight ``[in, out]``."""
    defaults = dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_inner=INTERMEDIATE,
        n_layer=LAYERS,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _build(tf.GPT2LMHeadModel, tf.GPT2Config, defaults, kw, seed)


def tiny_bert(seed: int = 0, **kw: Any) -> nn.Module:
    """BERT masked LM: an encoder, blocks at ``bert.encoder.layer``."""
    return _build(tf.BertForMaskedLM, tf.BertConfig, dict(_COMMON, pad_token_id=0), kw, seed)


def tiny_phi(seed: int = 0, **kw: Any) -> nn.Module:
    return _build(tf.PhiForCausalLM, tf.PhiConfig, dict(_COMMON, bos_token_id=0, eos_token_id=0), kw, seed)


_MOE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    bos_token_id=0,
    eos_token_id=0,
    tie_word_embeddings=False,
)


def tiny_mixtral(seed: int = 0, **kw: Any) -> nn.Module:
    """Mixtral: 4 fused experts (``experts.gate_up_proj`` [4, 128, 64]), top-2, router ``mlp.gate``."""
    return _build(
        tf.MixtralForCausalLM,
        tf.MixtralConfig,
        dict(_MOE, intermediate_size=64, num_local_experts=4),
        kw,
        seed,
    )


def tiny_qwen2_moe(seed: int = 0, **kw: Any) -> nn.Module:
    """Qwen2-MoE: 4 fused experts plus a shared expert and its ``shared_expert_gate`` (a Linear)."""
    defaults = dict(
        _MOE,
        intermediate_size=64,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_experts=4,
        norm_topk_prob=True,
    )
    return _build(tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig, defaults, kw, seed)


def tiny_qwen3_moe(seed: int = 0, **kw: Any) -> nn.Module:
    """Qwen3-MoE: 4 fused experts, top-2, no shared expert."""
    defaults = dict(
        _MOE, intermediate_size=64, moe_intermediate_size=64, num_experts=4, head_dim=16, norm_topk_prob=True
    )
    return _build(tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, defaults, kw, seed)


@dataclasses.dataclass(frozen=True)
class Arch:
    """A tiny architecture: its factory, where its blocks live and what its block linears are."""

    name: str
    factory: Callable[..., nn.Module]
    blocks: str  # qualified name of the repeated block list
    linears: tuple[str, ...]  # block linears, relative to a block
    causal: bool = True

    def __call__(self, seed: int = 0, **kw: Any) -> nn.Module:
        return self.factory(seed=seed, **kw)

    def expected_targets(self, layers: int = LAYERS) -> set[str]:
        return {f"{self.blocks}.{i}.{n}" for i in range(layers) for n in self.linears}


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

LLAMA = Arch("llama", tiny_llama, "model.layers", _LLAMA_LINEARS)
QWEN2 = Arch("qwen2", tiny_qwen2, "model.layers", _LLAMA_LINEARS)
MISTRAL = Arch("mistral", tiny_mistral, "model.layers", _LLAMA_LINEARS)
OPT = Arch(
    "opt",
    tiny_opt,
    "model.decoder.layers",
    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"),
)
GPT2 = Arch("gpt2", tiny_gpt2, "transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
BERT = Arch(
    "bert",
    tiny_bert,
    "bert.encoder.layer",
    (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
    causal=False,
)
PHI = Arch(
    "phi",
    tiny_phi,
    "model.layers",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
)

ALL_ARCHS = [LLAMA, QWEN2, MISTRAL, OPT, GPT2, BERT, PHI]
#: (name, factory) pairs for ``pytest.mark.parametrize``
ARCHS = [(a.name, a) for a in ALL_ARCHS]
#: the architectures every pruning method is checked on
CORE_ARCHS = [(a.name, a) for a in (LLAMA, OPT, GPT2, BERT)]


def calib_ids(n: int = 8, seqlen: int = 32, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Random calibration token ids [n, seqlen] (LongTensor), reproducible."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def weight_of(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` weight of a Linear or GPT-2 Conv1D (independent of llmpress)."""
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"parameters changed: {changed[:5]}"


# ----------------------------------------------------------------------------------- tokenizer


def data_texts() -> list[str]:
    return [(DATA_DIR / n).read_text(encoding="utf-8") for n in ("calib.txt", "eval.txt")]


def train_tokenizer(vocab_size: int = 256) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process on ``tests/data`` (deterministic), ids < ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<unk>"], show_progress=False
    )
    tk.train_from_iterator(data_texts(), trainer)
    assert tk.get_vocab_size() <= vocab_size
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )


def save_model_dir(path: Path, model: nn.Module, tokenizer: Any) -> Path:
    """A Hugging Face model folder (config, safetensors, tokenizer) like a Hub download."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every ``m`` consecutive input weights hold at most ``n`` nonzeros."""
    out, cols = weight.shape
    if cols % m:
        return False
    nnz = (weight.reshape(out, cols // m, m) != 0).sum(-1)
    return bool((nnz <= n).all())


def run_without_llmpress(folder: Path, ids: torch.Tensor, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``folder`` with plain transformers in a fresh process (asserting llmpress is never
    imported); returns its logits on ``ids`` and its greedy 6-token continuation of ``ids[:1, :4]``."""
    import subprocess
    import sys
    import textwrap

    torch.save(ids, tmp / "probe.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        assert "llmpress" not in sys.modules
        ids = torch.load({str(tmp / "probe.pt")!r})
        with torch.no_grad():
            torch.save(m(input_ids=ids).logits, {str(tmp / "out.pt")!r})
        torch.save(m.generate(ids[:1, :4], max_new_tokens=6, do_sample=False), {str(tmp / "gen.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    return torch.load(tmp / "out.pt"), torch.load(tmp / "gen.pt")
