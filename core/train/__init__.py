"""Recovery training: distillation fine-tuning that keeps a model's compression exactly.

The pieces apart: :mod:`.losses` (cross-entropy, logit KL, SquareHead), :mod:`.constraints`
(keep masks, straight-through training on a stored quantization grid, re-rounding), :mod:`.loop`
(AdamW, cosine schedule, accumulation, checkpoints and resumption through accelerate) and
:mod:`.stage` (the :class:`~llmpress.engine.stage.ModelStage` that validates and runs them).
"""
