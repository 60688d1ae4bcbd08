"""``llmpress demo``: train a small model on llmpress's own source, prune it with every
built-in method, evaluate, save, reload with plain ``from_pretrained`` and print a table."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ByteTokenizer:
    """Bytes as tokens (vocabulary 256): enough for a demo, no files needed."""

    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def demo_corpus() -> str:
    """The Python source of the installed llmpress package (shipped with it)."""
    root = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def train_demo_model(text: str, steps: int = 300, seqlen: int = 128, seed: int = 0) -> Any:
    """A 2-block Llama trained briefly on ``text`` (byte level) on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seqlen,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seqlen - 1, (16,), generator=g)
        x = torch.stack([data[s : s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:
            log.info("demo training step %d loss %.3f", step, loss.item())
    return model.eval()


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's result table as text."""
    lines = [f"{'method':<10} {'pattern':<13} {'sparsity':>8} {'perplexity':>10} {'reload':>10} {'time':>7}"]
    for r in rows:
        lines.append(
            f"{r['method']:<10} {r['pattern']:<13} {r['sparsity']:>8.3f} {r['ppl']:>10.3f} "
            f"{r['reload']:>10} {r['time_s']:>6.2f}s"
        )
    return "\n".join(lines)


def run_demo(out: Path | None = None, steps: int = 300) -> list[dict[str, Any]]:
    """Run the demo; returns the table rows (see :func:`format_table`)."""
    from transformers import AutoModelForCausalLM

    from llmpress.evaluate import perplexity
    from llmpress.pipeline import compress
    from llmpress.save import save_compressed

    text = demo_corpus()
    split = int(len(text) * 0.9)
    train, held = text[:split], text[split:]
    tok = ByteTokenizer()
    t0 = time.perf_counter()
    dense = train_demo_model(train, steps=steps)
    log.info("trained the demo model in %.1fs", time.perf_counter() - t0)
    base = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="llmpress-demo-"))
    dense_dir = base / "dense"
    save_compressed(dense, dense_dir, overwrite=True)
    rows = [
        {
            "method": "dense",
            "pattern": "-",
            "sparsity": 0.0,
            "ppl": perplexity(dense, tok, held, seqlen=128)["perplexity"],
            "reload": "-",
            "time_s": 0.0,
        }
    ]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for pattern in ("unstructured", "2:4"):
            model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
            recipe = {"stages": [{"method": method, "sparsity": 0.5, "pattern": pattern}]}
            t = time.perf_counter()
            model, report = compress(
                model, recipe, [train], tokenizer=tok, nsamples=32, seqlen=128, progress=False
            )
            dt = time.perf_counter() - t
            d = base / f"{method}-{pattern.replace(':', 'of')}"
            save_compressed(model, d, report=report, overwrite=True)
            back = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            x = torch.arange(64).view(1, 64)
            with torch.no_grad():
                same = torch.equal(model(input_ids=x).logits, back(input_ids=x).logits)
            rows.append(
                {
                    "method": method,
                    "pattern": pattern,
                    "sparsity": report.overall_sparsity,
                    "ppl": perplexity(model, tok, held, seqlen=128)["perplexity"],
                    "reload": "identical" if same else "DIFFERENT",
                    "time_s": dt,
                }
            )
    log.info("saved models under %s", base)
    return rows
