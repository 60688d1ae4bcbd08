"""Shared fixtures: a tiny tokenizer, a saved tiny model folder, a fresh plugin manager.

The model factories and helpers live in ``tests/models.py`` (imported as ``models``). The
local Hub (``tests/localhub``, fixtures ``local_hub`` and ``local_hub_factory``) is enabled
here, so that it sets ``HF_ENDPOINT`` before any test module imports ``huggingface_hub``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# pytest runs with --import-mode=importlib: make the helpers ``models`` and ``localhub`` importable
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

pytest_plugins = ["localhub.plugin"]


def pytest_configure(config: pytest.Config) -> None:
    # xdist workers share the CPU cores: one torch thread pool per core, not per worker
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE with 256 ids trained on tests/data (deterministic)."""
    from models import train_tokenizer

    return train_tokenizer(256)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved tiny Llama (vocab 256) with its tokenizer: what ``llmpress compress DIR`` reads."""
    from models import save_model_dir, tiny_llama

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    return save_model_dir(path, tiny_llama(seed=0, vocab=256), tokenizer)


@pytest.fixture
def fresh_plugin_manager():
    """Forget the process-wide plugin manager before and after the test."""
    from llmpress.plugin_manager import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()
