"""llmpress.hub: publishing compressed models to the Hugging Face Hub, and a local Hub for tests."""
