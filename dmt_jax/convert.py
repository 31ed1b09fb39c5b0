"""`dmt-convert SRC OUT`: an official teacher checkpoint -> a converted-teacher directory.

Reads .pth / .pth.tar / .bin (torch.load with weights_only=True: only tensors, plain containers and
argparse.Namespace are unpickled, so a malicious file cannot run code), .safetensors, TorchScript
archives (their tensors only; no TorchScript code is run) and .npz (np.load without pickles); unwraps
the format (dmt_jax/formats/); checks every tensor against the model its shapes imply; resizes the
position tables in PyTorch with the teacher's own interpolation when --img-size asks for another
grid; and writes spec.json + params.safetensors atomically (dmt_jax/teachers.py). Any bad input: one
line on stderr, exit code 2, nothing written. What it is doing goes to stdout, one line per phase.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dmt_jax import formats, hub, storage
from dmt_jax.errors import UserError, os_error_message
from dmt_jax.formats import files
from dmt_jax.models.vit import ACTIVATIONS
from dmt_jax.teachers import TeacherFileError, TeacherSpec, check_writable, save_teacher

EXIT_BAD_INPUT = 2


class ConversionError(UserError, ValueError):
    """Bad input to the converter; the message is one line."""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_checkpoint(src: str | os.PathLike) -> Mapping:
    """The checkpoint's top-level dict, read without running any code from it (formats/files.py), and
    refused before anything in it is materialized when it cannot be a checkpoint (check_contents)."""
    try:
        ckpt = files.read_checkpoint(src)
    except formats.FormatError as e:
        raise ConversionError(_first_line(e)) from e
    check_contents(ckpt, os.path.getsize(src))
    return ckpt


# What the file may declare, in float32 bytes, per byte it holds: a float16 file doubles, a uint8 buffer
# quadruples; a file declaring more repeats its storage (stride-0 views) and would be materialized.
DECLARED_PER_FILE_BYTE = 4
DECLARED_SLACK = 2**26  # 64 MB: small files


def check_contents(ckpt: Mapping, file_bytes: int) -> None:
    """ConversionError (one line) for a file that cannot be a checkpoint, read before anything in it is
    materialized: a key that is not a string where names are (the top level, a dict holding tensors);
    a tensor with more elements than its storage holds (a stride-0 / expanded view); tensors declaring
    more float32 bytes than the file could hold (views repeating one storage)."""
    bad_keys, repeats, declared = [], [], 0

    def walk(node, where: str, depth: int):
        nonlocal declared
        if depth > 8:
            return
        if isinstance(node, Mapping):
            holds_tensors = any(hasattr(v, "shape") for v in node.values())
            if depth == 0 or holds_tensors:
                bad_keys.extend(
                    f"{where}[{k!r}] ({type(k).__name__})" for k in node if not isinstance(k, str)
                )
            for k, v in node.items():
                walk(v, f"{where}[{k!r}]", depth + 1)
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]", depth + 1)
        elif hasattr(node, "untyped_storage"):  # a torch tensor: its size says nothing of its storage's
            if node.numel() * node.element_size() > node.untyped_storage().nbytes():
                repeats.append(f"{where} ({tuple(node.shape)} from {node.untyped_storage().nbytes()} bytes)")
            declared += node.numel() * 4
        elif hasattr(node, "shape") and hasattr(node, "size"):
            declared += int(node.size) * 4

    walk(ckpt, "checkpoint", 0)
    if bad_keys:
        raise ConversionError(
            f"not a checkpoint: keys that are not strings: {formats.name_list(bad_keys, 3)}"
        )
    if repeats:
        raise ConversionError(
            f"not a checkpoint: tensors that repeat their storage (stride-0 or overlapping views), which a "
            f"checkpoint never holds and would be materialized whole: {formats.name_list(repeats, 3)}"
        )
    if declared > DECLARED_PER_FILE_BYTE * file_bytes + DECLARED_SLACK:
        raise ConversionError(
            f"not a checkpoint: its tensors declare {declared / 1e9:.1f} GB as float32 in a file of "
            f"{file_bytes / 1e6:.1f} MB (views repeating one storage); nothing was materialized"
        )


def _to_numpy(array) -> np.ndarray:
    """A torch tensor (any float dtype, bfloat16 included) or numpy array -> float32 numpy."""
    if hasattr(array, "detach"):
        return array.detach().float().cpu().numpy()
    return np.asarray(array, np.float32)


def _is_float(array) -> bool:
    if hasattr(array, "is_floating_point"):
        return array.is_floating_point()
    return np.issubdtype(np.asarray(array).dtype, np.floating)


# Options every format takes, how its input is prepared (the others: CheckpointFormat.options).
_INPUT_OPTIONS = ("mean", "std", "input_resize")


def convert_checkpoint(
    src: str | os.PathLike | Mapping,
    out: str | os.PathLike,
    fmt: str = "auto",
    img_size: int | None = None,
    overwrite: bool = False,
    options: Mapping[str, Any] | None = None,
    source_name: str | None = None,
) -> TeacherSpec:
    """Converts `src` into the teacher directory `out`; ConversionError (one line) on any bad input.

    src: a checkpoint file, a name (timm:NAME, hf-hub:REPO, open_clip:MODEL/PRETRAINED, torchhub:NAME;
    fetched by dmt_jax/hub.py), or a checkpoint's tensors already read.
    options: what the tensor shapes cannot tell, for the formats that take it (`act`, `num_heads`,
    `ln_eps`; `mean`, `std`, `input_resize` for every format); None values mean the format's default.
    source_name: where the weights came from, for the spec (default: the file's absolute path)."""
    out = storage.path(out) if storage.is_remote(out) else Path(out)  # gs://... stays a bucket path
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if fmt != "auto" and fmt not in formats.FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; known formats: {', '.join(formats.DETECTION_ORDER)}")
    try:
        if not storage.is_remote(out):  # a bucket is checked by save_teacher
            check_writable(out, overwrite)  # before reading a large file
        if not isinstance(src, Mapping) and hub.is_name(src):  # timm:NAME, hf-hub:REPO, ...: fetch it
            _say(f"fetching {src}")
            fetched = hub.fetch(os.fspath(src))
            fmt = fetched.fmt if fmt == "auto" else fmt
            options = {**fetched.options, **options}  # the user's options win over the library's
            source_name, src = source_name or fetched.source, fetched.checkpoint
        if isinstance(src, Mapping):
            ckpt = src
        else:
            _say(f"reading {src}")
            ckpt = read_checkpoint(src)
        guessed = fmt == "auto"
        fmt = formats.detect(ckpt) if fmt == "auto" else fmt
        source = formats.get(fmt)
        if guessed and source.guess and (why := source.guess(ckpt)):
            _say(f"format {fmt} is a guess ({why}): if it is another, convert again with --format NAME")
        if refused := sorted(set(options) - set(source.options) - set(_INPUT_OPTIONS)):
            takes = ", ".join("--" + o.replace("_", "-") for o in source.options) or "neither"
            raise ConversionError(
                f"--{refused[0].replace('_', '-')} does not apply to --format {fmt} (it takes: {takes})"
            )
        try:
            state = source.to_reference(ckpt)
        except formats.FormatError:
            raise
        except (
            RuntimeError,
            TypeError,
            KeyError,
            IndexError,
            ValueError,
            AttributeError,
        ) as e:  # do not add up
            raise ConversionError(f"cannot unwrap the checkpoint as {fmt}: {_first_line(e)}") from e
        del ckpt
        if bad := sorted(k for k, v in state.items() if not hasattr(v, "shape") or not hasattr(v, "dtype")):
            raise ConversionError(f"{fmt} backbone entries that are not tensors: {formats.name_list(bad)}")
        config = source.infer(state, {k: v for k, v in options.items() if k in source.options})

        source_img_size = config.img_size
        img_size = source_img_size if img_size is None else img_size
        if img_size <= 0 or img_size % config.patch_size:
            raise ConversionError(
                f"--img-size {img_size} is not a positive multiple of the patch size {config.patch_size}"
            )
        resize = "none"
        if img_size != source_img_size:
            if source.resize is None:
                raise ConversionError(f"a {fmt} teacher cannot be resized: leave out --img-size")
            _say(f"resizing the position tables {source_img_size} -> {img_size} px")
            state, config, resize = source.resize(state, config, img_size)

        if bad := sorted(f"{k} ({v.dtype})" for k, v in state.items() if not _is_float(v)):
            raise ConversionError(f"tensors that are not floating point: {formats.name_list(bad)}")
        # Checked after the cast: float64 weights beyond float32's range (3.4e38) would become Inf.
        arrays = {k: _to_numpy(v) for k, v in state.items()}
        del state
        if bad := sorted(k for k, a in arrays.items() if not np.isfinite(a).all()):
            raise ConversionError(
                f"tensors holding NaN or Inf: {formats.name_list(bad)} (as float32: values beyond its range, "
                "3.4e38, are Inf); the checkpoint is damaged"
            )
        flat = source.to_flax(arrays, config)
        inputs = dict(mean=source.mean, std=source.std, input_resize=source.input_resize)
        inputs.update(source.inputs_for(config) if source.inputs_for else {})
        spec = TeacherSpec(
            format=fmt,
            family=source.family,
            config=config,
            mean=options.get("mean", inputs["mean"]),
            std=options.get("std", inputs["std"]),
            input_resize=options.get("input_resize", inputs["input_resize"]),
            source=source_name or str(Path(src).resolve()),
            source_img_size=source_img_size,
            pos_embed_resize=resize,
        )
        _say(f"writing {out} ({sum(v.size for v in flat.values()) / 1e6:.1f}M parameters)")
        save_teacher(out, spec, flat, overwrite=overwrite)
        return spec
    except (formats.FormatError, TeacherFileError) as e:
        raise ConversionError(_first_line(e)) from e
    except OSError as e:  # e.g. a full disk while writing OUT (the temp directory is removed)
        raise ConversionError(f"cannot write {out}: {os_error_message(e)}") from e


def _say(line: str) -> None:
    """One line per phase of a conversion (a large file takes a while to read and write)."""
    print(f"dmt-convert: {line}", flush=True)  # stdout: stderr carries only the one error line


def _formats_help() -> str:
    rows = [f"  {name:<9} {formats.FORMATS[name].summary} [{formats.FORMATS[name].repo}]"
            for name in formats.DETECTION_ORDER]  # fmt: skip
    return "formats (--format auto asks them in this order):\n" + "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dmt-convert",
        description="Convert an official teacher checkpoint into a dmt_jax teacher directory.",
        epilog=_formats_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src",
        help="checkpoint file (.pth, .pth.tar, .pt, .bin, .safetensors, .npz) or a name: timm:NAME, "
        "hf-hub:ORG/REPO, open_clip:MODEL/PRETRAINED, torchhub:NAME (fetched through that library's hub "
        "and cache; HF_HUB_OFFLINE=1: the caches only)",
    )
    parser.add_argument("out", help="output directory (spec.json + params.safetensors); must not exist")
    parser.add_argument(
        "--format", default="auto", choices=["auto", *formats.DETECTION_ORDER], help="default: detect"
    )
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution; another patch grid resizes the position embeddings "
                             "with the teacher's own interpolation (default: the checkpoint's)")  # fmt: skip
    parser.add_argument("--act", choices=list(ACTIVATIONS), default=None,
                        help="the MLP activation, which the tensors cannot tell (openclip: gelu unless "
                             "the model's name says quickgelu)")  # fmt: skip
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads, where not the width's standard (OpenCLIP bigG: 16, g: 16)",
    )
    parser.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="input mean on [0, 1] pixels (default: the format's)")  # fmt: skip
    parser.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="input std on [0, 1] pixels (default: the format's)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is a converted teacher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = dict(act=args.act, num_heads=args.num_heads, mean=args.mean, std=args.std)
        spec = convert_checkpoint(args.src, args.out, args.format, args.img_size, args.overwrite, options)
    except UserError as e:  # as in dmt_jax.main: a mistake the user can fix is one line, exit 2
        print(f"dmt-convert: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        f"dmt-convert: wrote {args.out}: {spec.format} {spec.variant} at {spec.img_size} px "
        f"({spec.grid}x{spec.grid} grid, {spec.num_prefix_tokens} prefix tokens, "
        f"summary {spec.summary_dim or 'none'}, pos_embed resize: {spec.pos_embed_resize})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
