"""The compression engine: calibration windows (``calibration``), block-input capture
(``capture``), the statistics registry (``stats``, ``moe_stats``, ``gradients``), torch.distributed
ranks (``distributed``) and the one block pass every blockwise stage runs in (``block_pass``), with
the per-layer solve (``solve``). It knows stages only through the typed protocol of
``engine.stage``; it never reads a recipe or looks a method up by name."""
