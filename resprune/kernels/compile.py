"""Compile the kernels for a GPU without one: ``python -m resprune.kernels.compile``.

Triton's interpreter (how CI runs the kernels on CPU tensors) does not type-check the way
the GPU compiler does: a kernel can pass every interpreted test and still fail to compile
on the GPU (seen on the first H200 run: a ``1e-38`` literal, below float32's smallest
normal, is a float64 constant to Triton 3.6's compiler, and ``sqrt_rn`` refused it). This
module compiles every kernel, in every specialisation the launchers use, to machine code
for a CUDA target (Hopper by default) with the ``ptxas`` that Triton's wheel carries, and
reports registers, spilled bytes and shared memory. It needs Triton, not a GPU.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Specialisation", "SPECIALISATIONS", "compile_all", "main"]

P32, PI64, PI32 = "*fp32", "*i64", "*i32"


@dataclass(frozen=True)
class Specialisation:
    """One kernel with one set of compile-time constants, as a launcher in
    ``resprune.kernels`` calls it."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, Any], ...]

    def __str__(self) -> str:
        return f"{self.kernel}[{', '.join(f'{k}={v}' for k, v in self.constants)}]"


def _sig(pointers: dict[str, str], ints: list[str], constants: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    # Python ints that fit are passed as i32 by a launch, as the strides and sizes here do
    return tuple(list(pointers.items()) + [(name, "i32") for name in ints]
                 + [(name, "constexpr") for name in constants])


def _specialisations() -> list[Specialisation]:
    out = []
    residual = {n: P32 for n in ("G", "E", "W", "FLOOR", "FB")} | {"FIRST": PI64, "F": P32, "OUT": PI64}
    for has_first in (False, True):
        for block_n in (16, 256):  # _pow2(n, 16, 256): the smallest and the largest block
            c = {"HAS_FIRST": has_first, "BLOCK_N": block_n, "BLOCK_T": 16}
            out.append(Specialisation("residual_persistent", _sig(
                residual, ["N", "K", "s_gb", "s_gn", "s_eb", "s_fb", "s_fk", "s_ob"], c), tuple(c.items())))
        for init in (True, False):
            c = {"HAS_FIRST": has_first, "INIT": init, "BLOCK_N": 64, "BLOCK_T": 16, "BLOCK_P": 256}
            step = ({n: P32 for n in ("G", "E0", "E", "W", "FLOOR", "FB")} | {"FIRST": PI64, "F": P32, "OUT": PI64}
                    | {"PART_V": P32, "PART_I": PI32, "PART_E": P32})
            out.append(Specialisation("residual_step", _sig(
                step, ["N", "t", "NB", "s_gb", "s_gn", "s_eb", "s_fb", "s_fk", "s_ob", "s_pb"], c), tuple(c.items())))
    for block_n in (16, 256):
        c = {"BLOCK_N": block_n}
        out.append(Specialisation("divprune_persistent", _sig(
            {"D": P32, "NEAREST": P32, "TOKEPT": P32, "OUT": PI64}, ["N", "K", "s_db", "s_dn", "s_nb", "s_ob"], c),
            tuple(c.items())))
    return out


SPECIALISATIONS = _specialisations()
"""Every kernel in the specialisations ``residual_select`` and ``divprune_select`` launch."""


def _resources(cubin: bytes) -> dict[str, int | None]:
    """Registers, stack and local (spilled) bytes per thread, and static shared bytes, as the
    ``cuobjdump`` in Triton's wheel reads them off the machine code (``None`` without it)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found: dict[str, int | None] = dict.fromkeys(("registers", "stack", "local", "shared"))
    if not tool.exists():
        return found
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    for key, name in (("REG", "registers"), ("STACK", "stack"), ("LOCAL", "local"), ("SHARED", "shared")):
        m = re.search(rf"\b{key}:(\d+)", text)
        found[name] = int(m.group(1)) if m else None
    return found


def compile_all(arch: int = 90, warp_size: int = 32) -> list[dict[str, Any]]:
    """Compile every specialisation for ``cuda`` compute capability ``arch``; one row per
    specialisation: ``kernel``, ``registers``, ``stack``, ``local`` (spilled bytes), ``shared``
    (bytes), or ``error``
    (the compiler's message) where it failed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from . import greedy

    functions = {"residual_persistent": greedy._residual_persistent, "residual_step": greedy._residual_step,
                 "divprune_persistent": greedy._divprune_persistent}
    rows = []
    for spec in SPECIALISATIONS:
        jitted = JITFunction(functions[spec.kernel])  # not triton.jit: under TRITON_INTERPRET it interprets
        src = ASTSource(jitted, signature=dict(spec.signature), constexprs=dict(spec.constants))
        row: dict[str, Any] = {"kernel": str(spec)}
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, warp_size))
        except Exception as exc:  # the compiler's own error is the result
            row["error"] = f"{type(exc).__name__}: {exc}"
        else:
            row.update(_resources(compiled.asm["cubin"]))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    args = parser.parse_args(argv)
    import triton

    rows = compile_all(args.arch)
    print(f"Triton {triton.__version__}, target cuda sm_{args.arch}\n")
    print("| kernel | registers | stack bytes | local (spilled) bytes | shared bytes |\n|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kernel']} | FAILED: {r['error'].splitlines()[-1]} | | | |")
        else:
            print(f"| {r['kernel']} | {r['registers']} | {r['stack']} | {r['local']} | {r['shared']} |")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"\n{r['kernel']}:\n{r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
