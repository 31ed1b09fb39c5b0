"""`dmt-convert SRC OUT`: an official PyTorch teacher checkpoint -> a converted-teacher directory.

Reads .pth / .pth.tar (torch.load with weights_only=True: only tensors, plain containers and
argparse.Namespace are unpickled, so a malicious file cannot run code) and .safetensors; unwraps the
format (dmt_jax/formats.py); checks every tensor against the variant its shapes imply; resizes the
position-embedding grid in PyTorch with the teacher's own interpolation when --img-size asks for
another grid; and writes spec.json + params.safetensors atomically (dmt_jax/teachers.py).
Any bad input: one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from dmt_jax import formats, storage
from dmt_jax.errors import UserError, os_error_message
from dmt_jax.teachers import TeacherFileError, TeacherSpec, check_writable, save_teacher

EXIT_BAD_INPUT = 2


class ConversionError(UserError, ValueError):
    """Bad input to the converter; the message is one line."""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_checkpoint(src: str | os.PathLike) -> Mapping:
    """The checkpoint's top-level dict, read without running any code from it."""
    import pickle
    import zipfile

    import torch

    path = Path(src)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO/iBOT/MAE training files hold args
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
            why = lines[0].strip() if lines else _first_line(e)
            raise ConversionError(
                f"{path}: refused to unpickle: it holds more than tensors, containers and argparse.Namespace "
                f"({why}); nothing in it was run"
            ) from e
        raise ConversionError(f"{path}: not a PyTorch checkpoint ({_first_line(e)})") from e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile, AttributeError) as e:
        raise ConversionError(f"{path}: truncated or not a PyTorch checkpoint ({_first_line(e)})") from e
    if not isinstance(ckpt, Mapping):
        raise ConversionError(f"{path}: not a checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "auto",
    img_size: int | None = None,
    overwrite: bool = False,
) -> TeacherSpec:
    """Converts `src` into the teacher directory `out`; ConversionError (one line) on any bad input."""
    import torch

    out = storage.path(out) if storage.is_remote(out) else Path(out)  # gs://... stays a bucket path
    if fmt != "auto" and fmt not in formats.FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; known formats: {', '.join(formats.FORMATS)}")
    try:
        if not storage.is_remote(out):  # a bucket is checked by save_teacher
            check_writable(out, overwrite)  # before reading a large file
        ckpt = read_checkpoint(src)
        fmt = formats.detect_format(ckpt) if fmt == "auto" else fmt
        spec_format = formats.FORMATS[fmt]
        try:
            backbone = spec_format.backbone(ckpt)
        except (RuntimeError, TypeError, KeyError, IndexError) as e:  # e.g. tensors that do not add up
            raise ConversionError(f"cannot unwrap the checkpoint as {fmt}: {_first_line(e)}") from e
        if bad := sorted(k for k, v in backbone.items() if not isinstance(v, torch.Tensor)):
            raise ConversionError(f"{fmt} backbone entries that are not tensors: {formats.name_list(bad)}")
        arch = formats.infer_architecture(backbone)
        formats.check_backbone(backbone, arch)

        source_img_size = arch.grid * arch.patch_size
        img_size = source_img_size if img_size is None else img_size
        if img_size <= 0 or img_size % arch.patch_size:
            raise ConversionError(
                f"--img-size {img_size} is not a positive multiple of the patch size {arch.patch_size}"
            )
        new_grid = img_size // arch.patch_size
        resize = "none"
        if new_grid != arch.grid:
            resize = spec_format.resize_method(arch)
            backbone["pos_embed"] = formats.resize_pos_embed(
                backbone["pos_embed"], arch.num_pos_prefix, new_grid, resize
            )
            arch = dataclasses.replace(arch, grid=new_grid)

        if bad := sorted(f"{k} ({v.dtype})" for k, v in backbone.items() if not v.is_floating_point()):
            raise ConversionError(f"tensors that are not floating point: {formats.name_list(bad)}")
        if bad := sorted(k for k, v in backbone.items() if not torch.isfinite(v).all()):
            raise ConversionError(
                f"tensors holding NaN or Inf: {formats.name_list(bad)}; the checkpoint is damaged"
            )
        flat = formats.timm_to_flax({k: v.detach().float().cpu().numpy() for k, v in backbone.items()})
        spec = TeacherSpec.of_architecture(
            arch,
            layerscale=arch.layerscale,
            format=fmt,
            variant=arch.variant,
            img_size=img_size,
            mean=spec_format.mean,
            std=spec_format.std,
            source=str(Path(src).resolve()),
            source_img_size=source_img_size,
            pos_embed_resize=resize,
        )
        save_teacher(out, spec, flat, overwrite=overwrite)
        return spec
    except (formats.FormatError, TeacherFileError) as e:
        raise ConversionError(_first_line(e)) from e
    except OSError as e:  # e.g. a full disk while writing OUT (the temp directory is removed)
        raise ConversionError(f"cannot write {out}: {os_error_message(e)}") from e


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dmt-convert",
        description="Convert an official self-supervised ViT checkpoint into a dmt_jax teacher directory.",
    )
    parser.add_argument("src", help="checkpoint file: .pth, .pth.tar or .safetensors")
    parser.add_argument("out", help="output directory (spec.json + params.safetensors); must not exist")
    parser.add_argument(
        "--format", default="auto", choices=["auto", *formats.FORMATS], help="default: detect"
    )
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution; another patch grid resizes the position embeddings "
                             "with the teacher's own interpolation (default: the checkpoint's)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is a converted teacher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        spec = convert_checkpoint(args.src, args.out, args.format, args.img_size, args.overwrite)
    except UserError as e:  # as in dmt_jax.main: a mistake the user can fix is one line, exit 2
        print(f"dmt-convert: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        f"dmt-convert: wrote {args.out}: {spec.format} {spec.variant} at {spec.img_size} px "
        f"({spec.grid}x{spec.grid} grid, {spec.num_reg_tokens} registers, "
        f"pos_embed resize: {spec.pos_embed_resize})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
