"""Jinja templates for llmpress model cards (package data)."""
