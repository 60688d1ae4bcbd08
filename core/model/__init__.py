"""How llmpress sees a Hugging Face model: its blocks and target linears (``modules``),
mixture-of-experts layouts (``moe``, ``moe_model``), block widths (``structures``), accelerate
placement (``offload``), modules left by dropping (``dropped``), and the typed records of a run:
per-layer results (``results``) and the report (``report``). Depends only on ``math`` and
``quant``."""
