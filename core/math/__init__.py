"""Pure math of pruning: damped Cholesky and inverse Hessians (``linalg``), the OBS column
sweep SparseGPT and GPTQ share (``obs``), N:M and unstructured masks (``masks``, ``targets``) and
the scores of structured pruning (``structured_math``). Tensors in, tensors out: nothing here
knows a model, a config or a plugin."""
