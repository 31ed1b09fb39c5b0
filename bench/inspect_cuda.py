"""Inspects the production training step as lowered for CUDA, on a machine without a GPU.

JAX can lower for a platform it does not run on (`lower(lowering_platforms=("cuda",))`); only
cuDNN's version query needs a GPU, so it is stubbed. The lowered StableHLO shows what the GPU
compiler gets: whether every attention is a cuDNN fused call, whether its q, k and v come straight
out of a GEMM (through reshapes and the bias add only: no slice or transpose, which would make the
compiler copy them first), and whether the patch embedding is a plain GEMM rather than a
convolution. Compiling needs the device, so the compiled (post-layout) text is not inspected here.

    python bench/inspect_cuda.py                      # S/16 student, 3 x B/16 teachers, 224 px
    python bench/inspect_cuda.py --student ti --teacher mu/16 --img-size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/step.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402

# What may sit between a GEMM and the attention call without a copy: views and elementwise ops.
PASS_THROUGH = {"reshape", "add", "convert", "multiply"}
# One op of StableHLO text: `%12 = stablehlo.add %10, %11 : ...`, `%7:2 = stablehlo.custom_call @x(%1, %2)`.
OP_LINE = re.compile(r"^\s*(%[\w#]+)(?::\d+)? = (?:stablehlo|mhlo|chlo)\.(\w+)(.*)$")
VALUE = re.compile(r"%[\w]+(?:#\d+)?")
TENSOR = re.compile(r"tensor<([^>]*)>")


@dataclasses.dataclass
class Op:
    name: str
    kind: str
    operands: list[str]
    text: str  # the rest of the line: attributes and types

    @property
    def result_shape(self) -> str:
        types = TENSOR.findall(self.text.rsplit("->", 1)[-1]) or TENSOR.findall(self.text)
        return types[-1] if types else ""


def parse_functions(text: str) -> list[dict[str, Op]]:
    """StableHLO module text -> one {value name: Op} per function (SSA names are per function)."""
    functions: list[dict[str, Op]] = []
    for line in text.splitlines():
        if line.lstrip().startswith("func.func"):
            functions.append({})
            continue
        m = OP_LINE.match(line)
        if m and functions:
            name, kind, rest = m.groups()
            head = rest.split("{", 1)[0].split(" : ", 1)[0]  # operands precede attributes and types
            functions[-1][name] = Op(name, kind, VALUE.findall(head), rest)
    return functions


def producer_chain(ops: dict[str, Op], value: str) -> list[str]:
    """Op kinds from `value` back to the GEMM that makes it, through pass-through ops only; ends at the
    first other op (its kind is the last entry) or at a function argument ('argument')."""
    chain = []
    while True:
        op = ops.get(value.split("#")[0])
        if op is None:
            return chain + ["argument"]
        chain.append(op.kind)
        if op.kind not in PASS_THROUGH:
            return chain
        # Follow the operand that carries the activation (same shape as the result; not a broadcast bias).
        same = [v for v in op.operands if v in ops and ops[v].result_shape == op.result_shape]
        same = [v for v in same if ops[v].kind != "broadcast_in_dim"] or same or op.operands
        value = same[0]


@dataclasses.dataclass
class Findings:
    attention_calls: int  # cuDNN fused attention calls (forward)
    direct_inputs: int  # their q/k/v operands made by a GEMM through pass-through ops only
    copied_inputs: list[str]  # the others: 'q of call 3: dot_general <- transpose <- ...'
    convolutions: int
    patch_gemms: list[str]  # dot_generals contracting over patch_size^2 * 3 pixels

    @property
    def ok(self) -> bool:
        # A plain GEMM contracts the patch's last axis with the kernel's first (after the teacher axis).
        plain = [g for g in self.patch_gemms if re.search(r"contracting_dims = \[(3\] x \[0|4\] x \[1)\]", g)]
        return (
            self.attention_calls > 0
            and not self.copied_inputs
            and not self.convolutions
            and len(plain) == len(self.patch_gemms) > 0
        )


def inspect(text: str, patch_size: int, grid: int) -> Findings:
    """What lowered StableHLO text says about the attention calls' inputs and the patch embeddings."""
    calls, direct, copied, convs, patch = 0, 0, [], 0, []
    # The forward patch GEMM: [.., grid, grid, p*p*3] x [(teachers,) p*p*3, width].
    k = patch_size * patch_size * 3
    patch_types = re.compile(rf"tensor<(\d+x)*{grid}x{grid}x{k}x\w+>, tensor<(\d+x)?{k}x\d+x\w+>")
    for ops in parse_functions(text):
        for op in ops.values():
            if op.kind == "convolution":
                convs += 1
            if op.kind == "dot_general" and patch_types.search(op.text):
                patch.append(op.text.split("precision")[0].strip() + " " + op.text.split(" : ")[-1].strip())
            if op.kind != "custom_call" or "fmha" not in op.text.split("(")[0] or "Backward" in op.text:
                continue
            calls += 1
            for role, value in zip("qkv", op.operands[:3], strict=False):
                chain = producer_chain(ops, value)
                if chain[-1] == "dot_general":
                    direct += 1
                else:
                    copied.append(f"{role} of call {calls}: " + " <- ".join(chain))
    return Findings(calls, direct, copied, convs, patch)


def stub_cudnn_version(version: int = 91000) -> None:
    """cuDNN attention asks the installed cuDNN for its version while tracing: the only step that
    needs a GPU. Answer for it (9.10)."""
    from jax._src.cudnn import fused_attention_stablehlo

    fused_attention_stablehlo.check_cudnn_version = lambda: version


def lower_for_cuda(jitted, *args) -> str:
    """StableHLO text of `jitted(*args)` (a jax.jit function; args may be ShapeDtypeStructs) for CUDA."""
    stub_cudnn_version()
    return jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def lower_step(args) -> str:
    """The trainer's jitted step (train.build) lowered for CUDA with cuDNN attention."""
    from step import make_config

    from dmt_jax import parallel, train

    stub_cudnn_version()  # building traces the student once (its shapes)
    config = make_config(args)
    # One device, as the H200 benchmark: on a larger mesh each attention is lowered as a
    # CustomSPMDPartitioning call that becomes the cuDNN call only when compiled.
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    setup = train.build(config, mesh)
    state = setup.abstract_state
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), setup.teacher_params)
    batch = {"image": jax.ShapeDtypeStruct((args.batch, args.img_size, args.img_size, 3), "uint8")}
    return lower_for_cuda(setup.step, state, params, batch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="s", choices=["ti", "s", "b"])
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--teacher", default="B/16", help="teacher variant")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dump", help="also write the lowered StableHLO text to this file")
    args = p.parse_args(argv)
    extra = dict(dtype="bfloat16", attention="cudnn", remat=False, fsdp=1)
    args = argparse.Namespace(**{**vars(args), **extra})
    text = lower_step(args)
    if args.dump:
        Path(args.dump).write_text(text)
    found = inspect(text, patch_size=16, grid=args.img_size // 16)
    print(f"cuDNN fused attention calls (forward): {found.attention_calls}")
    print(f"  q/k/v straight from a GEMM (reshape/bias add only): {found.direct_inputs}")
    for line in found.copied_inputs:
        print(f"  needs a copy: {line}")
    print(f"convolutions: {found.convolutions}")
    print(f"patch-embedding GEMMs: {len(found.patch_gemms)}")
    for line in found.patch_gemms:
        print(f"  {line}")
    print("OK" if found.ok else "NOT OK")
    return found


if __name__ == "__main__":
    main()
