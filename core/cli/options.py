"""What the commands share: device and tokenizer checks, the help formatter, common option help."""

from __future__ import annotations

import argparse
from typing import Any

from llmpress.errors import LlmpressError


def check_device(device: str) -> None:
    """Raise :class:`LlmpressError` unless ``device`` names a device this torch can use."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise LlmpressError(
            f"--device {device!r} is not a device name ({e}); use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmpressError(
                f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu, or "
                f"install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LlmpressError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type not in ("cpu", "meta") and not getattr(torch, dev.type, None):
        raise LlmpressError(f"--device {device}: unsupported device type {dev.type!r}")


def load_tokenizer(name: str) -> Any:
    """The tokenizer ``--tokenizer NAME`` names (a folder or Hub id), or :class:`LlmpressError`."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        raise LlmpressError(
            f"--tokenizer {name}: no tokenizer could be loaded ({e}); give a folder with tokenizer files "
            f"(tokenizer.json or tokenizer_config.json) or a Hub id"
        ) from None


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default value; an option whose default is "not given"
    says in its help what happens then, and flags are off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


TOKENIZER_HELP = "tokenizer folder or Hub id (default: the model's own; for a model saved without one)"
