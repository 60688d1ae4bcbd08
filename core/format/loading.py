"""Load a model with the Auto class its config implies (causal LM, masked LM, ...)."""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from llmpress.errors import CheckpointError, ModelError

log = logging.getLogger(__name__)

# (mapping name in transformers.models.auto.modeling_auto, Auto class name), most specific first
_AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AutoModelForPreTraining"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
)


def auto_class_for(config: PretrainedConfig) -> Any:
    """The transformers Auto class that loads ``config``'s architecture."""
    import transformers
    from transformers.models.auto import modeling_auto

    archs = list(getattr(config, "architectures", None) or [])
    for mapping_name, auto_name in _AUTO_CLASSES:
        mapping = getattr(modeling_auto, mapping_name, {})
        names: set[str] = set()
        for v in mapping.values():
            names.update(v if isinstance(v, (list, tuple)) else [v])
        if any(a in names for a in archs):
            return getattr(transformers, auto_name)
    if not archs:
        log.warning("config names no architecture; loading with AutoModelForCausalLM")
        return transformers.AutoModelForCausalLM
    raise ModelError(f"no transformers Auto class loads architecture {archs}; llmpress supports Hub models")


def load_dtype(dtype: str | torch.dtype | None, device: str, config: Any = None) -> torch.dtype | str:
    """The dtype :func:`load_model` loads in: ``dtype`` as given (a ``torch.dtype`` or its name);
    ``None`` or ``"auto"``: float32 on the CPU (half-precision math is slow and lossy there),
    else the dtype ``config`` says the checkpoint is stored in (``"auto"`` if it does not say)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if str(device).split(":")[0] == "cpu":
            return torch.float32
        return _config_dtype(config) or "auto"
    dt = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ModelError(f"unknown dtype {dtype!r}; use float32, float16, bfloat16 or auto")
    return dt


def dtype_name(dtype: torch.dtype | str) -> str:
    """``float16`` for ``torch.float16`` (strings as they are)."""
    return str(dtype).removeprefix("torch.")


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    max_memory: dict[Any, int] | None = None,
    offload_folder: str | None = None,
    tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local folder or Hub id; tokenizer may be ``None``.

    The one way llmpress loads a model (``eval``, ``compress``, ``pull``, the demo): every
    floating parameter, those of modules llmpress rebuilds included, is in the dtype chosen by
    :func:`load_dtype` (logged; ``model.dtype`` afterwards).

    ``max_memory`` (``{gpu index or "cpu": bytes}``): dispatch with accelerate
    (``device_map="auto"``) under those budgets; what fits nowhere goes to ``offload_folder``.
    ``tokenizer=False``: the model only (``None`` for the tokenizer).
    """
    import transformers

    src = model_source(name_or_path)
    config = load_config(src, trust_remote_code=trust_remote_code)
    cls = auto_class_for(config)
    dt = load_dtype(dtype, device, config)
    log.info("loading %s in %s with %s", src, dtype_name(dt), cls.__name__)
    if max_memory is not None:
        model = cls.from_pretrained(
            src,
            dtype=dt,
            trust_remote_code=trust_remote_code,
            device_map="auto",
            max_memory=max_memory,
            offload_folder=offload_folder,
        )
        log.info("device map: %s", sorted(set(getattr(model, "hf_device_map", {}).values()), key=str))
    else:
        model = cls.from_pretrained(src, dtype=dt, trust_remote_code=trust_remote_code)
        model.to(device)
    model.eval()
    if not isinstance(dt, torch.dtype):
        log.info("loaded %s in %s (the checkpoint's dtype)", src, dtype_name(model.dtype))
    if not tokenizer:
        return model, None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        log.warning("no tokenizer loaded from %s (%s)", src, e)
        tok = None
    return model, tok


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is shaped like a Hub model id (``gpt2``, ``org/model``), not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    if "/" in name and Path(name.split("/", 1)[0]).is_dir():  # models/llama beside a models/ folder
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_source(name_or_path: str | Path) -> str:
    """``name_or_path`` as ``from_pretrained`` takes it: an existing local folder (``~`` expanded),
    or a Hub id.

    :raises ModelError: a local path (see :func:`is_hub_id`) that is not a folder.
    """
    src = str(name_or_path)
    path = Path(src).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelError(f"{src} is a file, not a model folder; give the folder that holds its config.json")
    if not is_hub_id(src):
        raise ModelError(
            f"no such folder: {src} ({path.absolute()} does not exist); check the path "
            "(a model is a local folder or a Hub id such as org/model)"
        )
    return src


def load_config(name_or_path: str | Path, trust_remote_code: bool = False) -> Any:
    """The transformers config of a local model folder or Hub id.

    :raises ModelError: no such folder, a folder without ``config.json``, or a Hub id that
        cannot be fetched (one line: the path or connection to check).
    :raises CheckpointError: a local folder's shard index is broken (:func:`check_shard_index`).
    """
    import transformers

    src = model_source(name_or_path)
    if Path(src).is_dir():
        if not (Path(src) / "config.json").is_file():
            raise ModelError(f"{src} holds no config.json: it is not a Hugging Face model folder")
        check_shard_index(Path(src))
    try:
        return transformers.AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".") + "."
        if Path(src).is_dir():
            raise ModelError(f"cannot read the model config in {src}: {first}") from e
        raise ModelError(
            f"no such folder: {src} ({Path(src).absolute()}), and as a Hub model id it cannot be loaded: {first} "
            "Check the path, or the Hub id and your connection (HF_HUB_OFFLINE=1 uses cached models only)"
        ) from e


def stored_dtype(name_or_path: str | Path, trust_remote_code: bool = False) -> torch.dtype | None:
    """The dtype a checkpoint's config says its weights are stored in (``None`` if unknown)."""
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return _config_dtype(cfg)


def _config_dtype(cfg: PretrainedConfig) -> torch.dtype | None:
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else None


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_shard_index(folder: Path) -> None:
    """Raise :class:`CheckpointError` if a sharded checkpoint's index is not valid JSON, is not
    a mapping of tensor names to shards, names a shard outside ``folder`` (an absolute path,
    ``..``, or a link that leads out of it) or a shard that is not there."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not valid JSON ({e}); re-download the checkpoint") from None
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(
                f"{index} has no 'weight_map' of tensor names to shard files; re-download it"
            )
        for tensor, shard in sorted(wmap.items(), key=lambda kv: kv[1]):
            _check_inside(folder, index, tensor, shard)
        missing = sorted({v for v in wmap.values() if not (folder / v).is_file()})
        if missing:
            raise CheckpointError(
                f"{index} names shard file(s) {missing[:3]} that are not in {folder}; re-download it"
            )


def _check_inside(folder: Path, index: Path, tensor: str, shard: str) -> None:
    """The index entry ``tensor -> shard`` names a file inside ``folder``. A link out of it is
    allowed only into the Hugging Face cache's ``blobs`` folder of the same repository
    (``snapshots/<revision>/<file> -> ../../blobs/<hash>``, the layout huggingface_hub writes)."""
    forms = (PurePosixPath(shard), PureWindowsPath(shard))  # a Windows name is refused here too
    problem = None
    if any(f.anchor for f in forms):
        problem = "is an absolute path"
    elif any(".." in f.parts for f in forms):
        problem = "leads out of the checkpoint folder ('..')"
    else:
        real, root = (folder / shard).resolve(), folder.resolve()
        blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
        if not real.is_relative_to(root) and not (blobs is not None and real.is_relative_to(blobs)):
            problem = f"is a link that leads out of the checkpoint folder (to {real})"
    if problem:
        raise CheckpointError(
            f"{index}: the entry {tensor!r} -> {shard!r} {problem}; a shard index may only name files in "
            f"{folder}: re-download the checkpoint, or fix the weight_map"
        )
