"""Kernel selection and the CPU kernels against the torch reference (decode on every call).

Tolerance: ``cpu-int`` runs with bf16 activations and a bf16 output, so it matches the
fp32 reference to ``2e-2`` of the output's largest magnitude (bf16 keeps 8 significant bits).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from _kernel_layers import int_layer

import llmpress
import llmpress.plugins
from llmpress import hookimpl
from llmpress.format.formats import FORMATS, ModuleFormat
from llmpress.format.runtime import LlmpressLinear
from llmpress.kernels import cpu_int
from llmpress.kernels.registry import Kernel, KernelRegistrar, KernelTable, choose_kernel, offered_kernels
from llmpress.plugin_manager import make_plugin_manager

CPU = torch.device("cpu")
needs_cpu_kernels = pytest.mark.skipif(not cpu_int.available(), reason="torch has no CPU int kernels")


def _reference(module: LlmpressLinear, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ module.dequantized_weight(torch.float64).T


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


CASES = [  # out, in, bits, group, symmetric
    (37, 96, 4, 32, False),  # odd N (padded to 16), K not a multiple of 128
    (48, 192, 4, 64, True),
    (16, 256, 4, 128, False),
    (20, 128, 4, -1, True),  # per channel: kernel groups of 128 sharing one scale
    (33, 160, 3, 32, True),  # 3-bit codes on the 4-bit kernel
    (24, 64, 2, 64, False),
    (37, 96, 8, -1, True),
    (37, 96, 8, -1, False),  # asymmetric int8: zero-point correction term
    (16, 64, 6, -1, False),
]


@needs_cpu_kernels
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("rows", [1, 3, 17, cpu_int.MAX_ROWS + 5])
def test_cpu_int_matches_reference(case: tuple, rows: int) -> None:
    out_f, in_f, bits, gs, sym = case
    module = int_layer(out_f, in_f, bits, gs, sym)
    assert module.set_kernel().name == "cpu-int"
    x = torch.randn(1, rows, in_f, generator=torch.Generator().manual_seed(rows))
    for dtype in (torch.float32, torch.bfloat16):
        y = module(x.to(dtype))
        assert y.dtype == dtype and y.shape == (1, rows, out_f)
        tol = 2e-2 if dtype == torch.float32 else 4e-2
        assert _rel_err(y, _reference(module, x.to(dtype).float())) < tol, (case, rows, dtype)


@needs_cpu_kernels
def test_cpu_int_large_rows_take_the_dense_path(monkeypatch: pytest.MonkeyPatch) -> None:
    module = int_layer(32, 64, 4, 32, False)
    module.set_kernel("cpu-int")
    calls = []
    real = cpu_int.dense_weight
    monkeypatch.setattr(cpu_int, "dense_weight", lambda q, d: calls.append(d) or real(q, d))
    x = torch.randn(cpu_int.MAX_ROWS + 1, 64)
    y = module(x)
    assert calls == [torch.float32]  # the decoded weight in x's dtype: exact up to fp32 rounding
    assert _rel_err(y, _reference(module, x)) < 1e-5
    module(x[:1])
    assert len(calls) == 1


def _fmt(fmt: str, bits: int | None = None, gs: int | None = None) -> ModuleFormat:
    nnz = 100 if fmt == "bitmask" else None
    return ModuleFormat(fmt, 128, 64, bits=bits, group_size=gs, symmetric=True, nnz=nnz)


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (_fmt("int", 4, 128), "cpu-int"),
        (_fmt("int", 3, 64), "cpu-int"),
        (_fmt("int", 8, -1), "cpu-int"),
        (_fmt("int", 8, 64), "dense"),  # no grouped int8 CPU kernel: decode once
        (_fmt("int", 4, 16), "dense"),  # the int4 kernel needs groups of 32k
        (_fmt("int-2:4", 4, 128), "dense"),
        (_fmt("2:4"), "dense"),
        (_fmt("bitmask"), "dense"),
    ],
)
def test_default_kernel_on_cpu(fmt: ModuleFormat, expected: str) -> None:
    if expected == "cpu-int" and not cpu_int.available():
        pytest.skip("torch has no CPU int kernels")
    names = {k.name for k in offered_kernels(fmt, CPU)}
    assert "triton-int" not in names and "torch-24" not in names  # CUDA only
    assert {"dense", "torch"} <= names
    assert choose_kernel(fmt, CPU).name == expected


def test_user_choice_overrides_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = _fmt("int", 4, 128)
    assert choose_kernel(fmt, CPU, "torch").name == "torch"
    monkeypatch.setenv("LLMPRESS_KERNEL", "no-such-kernel, dense")
    assert choose_kernel(fmt, CPU).name == "dense"


# ------------------------------------------------------------- kernels offered per format


def _doubling(module: LlmpressLinear, state: object, x: torch.Tensor) -> torch.Tensor:
    return 2 * torch.nn.functional.linear(x, module.dequantized_weight(x.dtype))


DOUBLE = Kernel(
    "double", 99, lambda m: None, _doubling, formats=frozenset({"bitmask"}), devices=frozenset({"cpu"})
)


class _DoublePlugin:
    @hookimpl
    def llmpress_register_kernels(self, register: KernelRegistrar) -> None:
        register(DOUBLE)


def test_a_registered_kernel_is_offered_only_for_its_formats_and_devices() -> None:
    pm = make_plugin_manager([_DoublePlugin()])
    assert [k.name for k in pm.kernels_for(_fmt("bitmask"), CPU)][-1] == "double"
    assert "double" not in {k.name for k in pm.kernels_for(_fmt("2:4"), CPU)}
    assert "double" not in {k.name for k in pm.kernels_for(_fmt("bitmask"), torch.device("meta"))}
    assert choose_kernel(_fmt("bitmask"), CPU, source=pm.kernels_for).name == "double"
    assert choose_kernel(_fmt("bitmask"), CPU).name == "dense"  # the installed source: the global manager
    assert ["double"] in pm.sections()["kernels"].values()  # `llmpress plugins` lists it


def test_the_injected_source_runs_a_layer() -> None:
    pm = make_plugin_manager([_DoublePlugin()])
    dense = int_layer(16, 32, 4, 32, True)
    fmt = dense.fmt.model_copy(update={"format": "bitmask"})
    assert choose_kernel(fmt, CPU, source=pm.kernels_for) is DOUBLE
    x = torch.randn(3, 32)
    dense.set_kernel("torch", kernels=pm.kernels_for)
    ref = dense(x)
    dense.kernel, dense._kernel_state = DOUBLE, None
    assert torch.allclose(dense(x), 2 * ref)


@pytest.mark.parametrize("formats", [frozenset({"no-such-format"}), frozenset()])
def test_a_kernel_must_name_registered_formats(formats: frozenset[str]) -> None:
    with pytest.raises(ValueError, match="unknown formats"):
        KernelTable([dataclasses.replace(DOUBLE, formats=formats)], known_formats=FORMATS)


def test_a_kernel_registered_twice_for_a_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        KernelTable([DOUBLE, DOUBLE], known_formats=FORMATS)


def test_no_plugin_guards_a_format_name_and_the_format_layer_has_no_plugin_manager() -> None:
    root = Path(llmpress.__file__).parent
    for path in [*(root / "format").glob("*.py"), *(root / "kernels").glob("*.py")]:
        assert "plugin_manager" not in path.read_text(), f"{path} reaches the plugin manager"
    for path in Path(llmpress.plugins.__file__).parent.glob("export_*.py"):
        text = path.read_text()
        assert "llmpress_register_kernels" in text and "llmpress_export_kernel" not in text, path
        assert not re.search(r"fmt\.format\s*(==|!=|in|not in)", text), f"{path} guards on a format name"
        assert not re.search(r"device\.type\s*(==|!=)", text), f"{path} guards on a device type"


def test_every_kernel_agrees_with_torch_on_cpu() -> None:
    module = int_layer(40, 128, 4, 64, False)
    x = torch.randn(2, 5, 128)
    ref = _reference(module, x)
    for kernel in offered_kernels(module.fmt, CPU):
        module.set_kernel(kernel.name)
        tol = 2e-2 if kernel.name == "cpu-int" else 1e-5
        assert _rel_err(module(x), ref) < tol, kernel.name


def test_dense_kernel_decodes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    module = int_layer(24, 64, 8, 32, True)
    module.set_kernel("dense")
    calls = []
    real = LlmpressLinear.dequantized_weight
    monkeypatch.setattr(
        LlmpressLinear, "dequantized_weight", lambda self, d=None: calls.append(d) or real(self, d)
    )
    for _ in range(3):
        module(torch.randn(1, 64, dtype=torch.float16))
    assert calls == []  # decoded at load in the stored dtype
    for _ in range(3):
        module(torch.randn(1, 64))
    assert calls == [torch.float32]  # another compute dtype: decoded again, once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernels_match_reference() -> None:  # pragma: no cover - GPU only
    cuda = torch.device("cuda")
    for bits, gs, sym in [(4, 128, True), (4, 64, False), (3, 128, True), (8, -1, True), (8, 128, False)]:
        module = int_layer(4096, 1024, bits, gs, sym).to(cuda)
        assert module.set_kernel().name == "triton-int"
        for rows in (1, 7, 16, 64, 600):
            x = torch.randn(rows, 1024, device=cuda, dtype=torch.float16)
            assert _rel_err(module(x), _reference(module, x.float())) < 1e-2, (bits, gs, sym, rows)


TRITON_WIRING = """
import sys, torch
sys.path.insert(0, {tests!r})
from _kernel_layers import int_layer
from llmpress.kernels import triton_int
from llmpress.plugins import export_triton
torch.manual_seed(0)
# any stored width runs on the 4- or 8-bit kernel: 2-4 bits with explicit zero points on the 4-bit one
for bits, gs, sym in [(3, 32, True), (4, 32, True), (4, -1, False), (2, 64, False), (5, 32, True), (8, -1, False)]:
    module = int_layer(19, 64, bits, gs, sym, "float16", seed=bits)
    state = export_triton._prepare(module)
    assert state.bits == export_triton.kernel_bits(bits)
    ref = module.dequantized_weight(torch.float32)
    for rows in (1, 5):
        x = torch.randn(rows, 64, dtype=torch.float16)
        y = triton_int.int_matmul(x, state).float()
        want = x.float() @ ref.T
        err = float((y - want).abs().max() / want.abs().max())
        assert err < 3e-3, (bits, gs, sym, rows, err)
print("ok")
"""


def test_triton_int_plugin_runs_every_width_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = TRITON_WIRING.format(tests=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
