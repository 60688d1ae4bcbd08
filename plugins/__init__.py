"""Built-in llmpress plugins: one module per method, registered through entry points."""
