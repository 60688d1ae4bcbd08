"""``llmpress compress``: check the inputs, load, compress, save, print a summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmpress.cli.options import TOKENIZER_HELP, DefaultsFormatter, check_device, load_tokenizer
from llmpress.errors import LlmpressError

if TYPE_CHECKING:
    from llmpress.model.report import CompressionReport
    from llmpress.recipe.plan import Plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``compress`` and its options to the subcommands ``sub``."""
    c = sub.add_parser("compress", help="compress a model with a recipe", formatter_class=DefaultsFormatter)
    c.add_argument("model", help="local model folder or Hub id")
    c.add_argument("--recipe", required=True, help="YAML or JSON recipe file")
    c.add_argument(
        "--calib",
        help="calibration text (.txt, .jsonl, dataset folder or Hub dataset id); without it only "
        "data-free methods run (magnitude, rtn, fp8)",
    )
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--tokenizer", default=None, metavar="PATH_OR_ID", help=TOKENIZER_HELP)
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence")
    c.add_argument("--seed", type=int, default=0, help="seed that draws the calibration sequences")
    c.add_argument("--device", default="cpu", help="compute device, e.g. cuda or cuda:0")
    c.add_argument("--dtype", default="auto", help="compute dtype (auto: fp32 on CPU, stored dtype on GPU)")
    c.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="calibration sequences per block forward (default: as many as hold 8192 tokens)",
    )
    c.add_argument("--offload-activations", action="store_true", help="keep calibration activations on CPU")
    c.add_argument(
        "--offload-stats",
        action="store_true",
        help="keep layer input statistics (X^T X) on CPU, each layer's on the device only for its solve",
    )
    c.add_argument(
        "--offload-model", action="store_true", help="keep the model on CPU, one block at a time on --device"
    )
    c.add_argument(
        "--max-gpu-memory",
        default=None,
        metavar="SIZE",
        help="GPU budget, e.g. 20GiB: load with accelerate (device_map) keeping what does not fit on CPU, "
        "one block at a time on the GPU; calibration activations go to CPU when they do not fit "
        "(default: none, the whole model on --device)",
    )
    c.add_argument(
        "--offload-folder",
        default=None,
        help="with --max-gpu-memory: weights that do not fit in CPU memory (default: none, all in memory)",
    )
    c.add_argument(
        "--keep-dtype", action="store_true", help="save in the compute dtype instead of the checkpoint's"
    )
    c.add_argument(
        "--format",
        default="llmpress",
        choices=["llmpress", "compressed-tensors"],
        help="on-disk format: llmpress (packed, loads after `import llmpress`) or compressed-tensors "
        "(weight-only int4/int8, read natively by vLLM and transformers)",
    )
    c.add_argument(
        "--sparse-format",
        default=None,
        choices=["dense", "auto", "bitmask", "2:4"],
        help="storage of pruned layers: dense (an ordinary checkpoint; default for pruning-only recipes), "
        "auto (2:4 or bitmask when smaller; default with quantization), bitmask or 2:4",
    )
    c.add_argument(
        "--adapter",
        default=None,
        choices=["peft"],
        help="also write the low-rank paths of an 'eora' stage as a PEFT LoRA adapter in "
        "OUT/peft_adapter (load it with peft on the compressed base without them)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    c.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    """``llmpress compress``: the recipe and inputs are checked before the model loads."""
    from llmpress.engine import distributed
    from llmpress.format.output import check_output_path, claim_output
    from llmpress.recipe.plan import make_plan
    from llmpress.recipe.recipes import Recipe

    # read and resolved once for the whole run: an unknown method or a bad option fails before loading
    plan = make_plan(Recipe.load(a.recipe))
    if a.format == "compressed-tensors":
        from llmpress.cli.export_checks import check_recipe_exportable

        check_recipe_exportable([s.config for s in plan.stages], plan.kv_cache)
    if getattr(a, "adapter", None) == "peft" and not any(type(s.config).adds_lowrank for s in plan.stages):
        raise LlmpressError(
            "--adapter peft writes the low-rank paths of an 'eora' stage, and the recipe has none"
        )
    check_device(a.device)
    if a.max_gpu_memory is not None:
        from llmpress.cli.budget import parse_memory

        parse_memory(a.max_gpu_memory)  # a bad size fails before loading anything
        if not a.device.startswith("cuda"):
            raise LlmpressError("--max-gpu-memory budgets a GPU: use it with --device cuda (or cuda:N)")
    if a.calib is not None and Path(a.calib).is_file():
        from llmpress.engine.calibration import read_documents

        read_documents(a.calib)  # an unreadable or binary file fails now, not after loading the model
    started = not distributed.is_initialized()
    a.device = distributed.init_from_env(a.device)  # torchrun / accelerate launch: join the group
    try:
        if not distributed.is_main():  # only rank 0 writes; the others compress their share and wait
            check_output_path(Path(a.out).resolve(), a.overwrite)
            return _compress_into(a, plan, None)
        with claim_output(a.out, a.overwrite) as out:  # held until saved: a concurrent run fails at once
            return _compress_into(a, plan, out)
    finally:
        if started and distributed.is_initialized():
            import torch.distributed as dist

            dist.destroy_process_group()


def _load_for_compress(a: argparse.Namespace) -> tuple[Any, Any, bool, bool]:
    """``(model, tokenizer, offload_activations, offload_stats)``: loaded whole, or under
    ``--max-gpu-memory`` with accelerate (the rest offloaded to CPU) and activations and
    statistics on CPU when they do not fit."""
    import torch

    from llmpress.engine import distributed
    from llmpress.format.loading import load_model, stored_dtype

    if a.max_gpu_memory is None:
        model, tok = load_model(a.model, dtype=a.dtype, device="cpu" if a.offload_model else a.device)
        return model, tok, a.offload_activations, a.offload_stats
    import transformers
    from accelerate.utils import get_max_memory

    from llmpress.cli.budget import parse_memory, plan_memory

    dev = torch.device(a.device)
    cfg = transformers.AutoConfig.from_pretrained(a.model)
    dt = stored_dtype(a.model) if a.dtype == "auto" else getattr(torch, str(a.dtype), None)
    nbytes = dt.itemsize if isinstance(dt, torch.dtype) else 2
    plan = plan_memory(
        cfg, parse_memory(a.max_gpu_memory), a.nsamples, a.seqlen, nbytes, distributed.world_size()
    )
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    budgets = {k: v for k, v in get_max_memory().items() if not isinstance(k, int)}  # cpu (and disk)
    budgets[idx] = plan.weights
    model, tok = load_model(
        a.model, dtype=a.dtype, device=a.device, max_memory=budgets, offload_folder=a.offload_folder
    )
    return (
        model,
        tok,
        a.offload_activations or plan.offload_activations,
        a.offload_stats or plan.offload_stats,
    )


def _compress_into(a: argparse.Namespace, plan: Plan, out: Path | None) -> int:
    """Load, compress and (with ``out``; ``None`` on ranks other than 0) save."""
    import torch

    from llmpress.cli.evaluate import check_seqlen
    from llmpress.engine import distributed
    from llmpress.format.loading import stored_dtype
    from llmpress.format.save import save_result
    from llmpress.pipeline.compress import compress

    saved_dtype = stored_dtype(a.model)  # read before loading: loading in fp32 overwrites config.dtype
    own_tok = None if a.tokenizer is None else load_tokenizer(a.tokenizer)  # a bad name fails before loading
    model, tok, offload_activations, offload_stats = _load_for_compress(a)
    tok = own_tok if own_tok is not None else tok
    if a.format == "compressed-tensors":  # MoE expert projections: refused before any work
        from llmpress.cli.export_checks import check_model_exportable

        check_model_exportable(model, list(plan.stages))
    if a.calib is not None:
        check_seqlen(model.config, a.seqlen, "--seqlen")
    model, report = compress(
        model,
        plan,
        a.calib,
        tokenizer=tok,
        nsamples=a.nsamples,
        seqlen=a.seqlen,
        seed=a.seed,
        device=a.device,
        batch_size=a.batch_size,
        offload_activations=offload_activations,
        offload_stats=offload_stats,
        progress=distributed.is_main(),
    )
    if out is None:
        distributed.barrier()  # rank 0 saves
        return 0
    save_dtype = saved_dtype if isinstance(saved_dtype, torch.dtype) and not a.keep_dtype else None
    save_result(
        model,
        out,
        report=report,
        tokenizer=tok,
        dtype=save_dtype,
        overwrite=a.overwrite,
        fmt=a.format,
        sparse_format=a.sparse_format,
    )
    if getattr(a, "adapter", None) == "peft":
        from llmpress.format.lowrank import PEFT_SUBFOLDER, lowrank_paths, write_peft_adapter

        write_peft_adapter(lowrank_paths(model, report.state), out / PEFT_SUBFOLDER, base_model=str(a.model))
    distributed.barrier()
    print(compress_summary(report, plan, out))
    if report.allocation is not None:
        al = report.allocation
        print(
            f"allocation {al['method']}: {al['kind']} budget {al['target']:g} met exactly, "
            f"fitness {al['fitness']}, {al['evaluations']} evaluations"
            + (f"; dropped {', '.join(al['dropped'])}" if al.get("dropped") else "")
        )
    return 0


def compress_summary(report: CompressionReport, plan: Plan, out: Path) -> str:
    """The line ``compress`` prints: the measures that apply to the recipe (sparsity when a
    stage prunes, block parameters removed, bits per weight when quantized), size on disk, time."""
    parts = []
    if any(s.config.sparsity_target() is not None for s in plan.stages):
        parts.append(f"overall sparsity {report.overall_sparsity:.4f}")
    removed = report.structure.get("removed_fraction")
    if removed is not None:
        parts.append(f"block parameters removed {removed:.4f}")
    if report.average_bits is not None:
        parts.append(f"{report.average_bits:.2f} bits per weight")
    mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    parts.append(f"{mb / 1e3:.2f} GB on disk" if mb >= 1e3 else f"{mb:.2f} MB on disk")
    parts.append(f"{report.wall_time_s:.1f}s")
    return f"compressed {len(report.modules)} layers to {out} ({', '.join(parts)})"
