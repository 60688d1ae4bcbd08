"""The on-disk format and loading it back: the format registry (``formats``), saving
(``save``, ``shards``, ``structured_export``, ``output``), the checkpoint schema and checksums
(``checkpoint``), the transformers quantizer (``hf_quantizer``), runtime modules (``runtime``),
the FP8 KV cache (``kv_cache``), compressed-tensors export and model loading (``loading``).
It never imports the engine: a saved model loads without the compression machinery."""
