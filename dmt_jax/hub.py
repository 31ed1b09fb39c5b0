"""Teachers by name: `dmt-convert timm:NAME OUT` (and `hf-hub:REPO`, `open_clip:MODEL/PRETRAINED`,
`torchhub:NAME`) fetch the weights through each library's own hub code and cache, then convert them
exactly as a file (dmt_jax/convert.py), the name recorded as the teacher's source.

- `timm:NAME[.TAG]`: timm's pretrained_cfg and hub code (`timm/NAME` on the Hugging Face hub, HF cache),
  converted as format `timm` (timm's VisionTransformer) or `eva02` (timm's Eva: EVA-02 CLIP towers);
- `hf-hub:ORG/REPO`: timm's too (the repo's config.json, then its weights), format `timm`;
- `open_clip:MODEL/PRETRAINED`: open_clip's pretrained table and download (HF cache or ~/.cache/clip),
  converted as format `clip` (OpenAI's weights), `eva02` (the EVA02-* towers) or `openclip` (the others);
- `torchhub:NAME`: the official file that the repository's hub code loads (DINOv2's hubconf names, SAM's
  sam_vit_b/l/h), fetched by torch.hub's download into its checkpoints folder, the file's format.

What the tensor shapes cannot tell comes from the library, not from guesses: for timm, the activation,
LayerNorm epsilon and heads of timm's own model (built on the meta device: no memory, no weights) and
mean, std and resize of its pretrained_cfg; for open_clip, mean, std, QuickGELU and head width of its
tables.
HF_HUB_OFFLINE=1 (also honoured for torch hub's files) reads the caches only; a name neither cached nor
reachable is one line naming the file to download and where to put it. torch and the hub libraries are
imported only here, and only when a name is converted.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

from dmt_jax.errors import UserError

SCHEMES = ("timm", "hf-hub", "open_clip", "torchhub")

# torchhub:NAME -> the file the repository's own hub code downloads (torch.hub.load_state_dict_from_url).
# DINOv2's hubconf names; SAM has no hubconf, its models are named as its files and build_sam registry.
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
_SAM = "https://dl.fbaipublicfiles.com/segment_anything"
TORCH_HUB_FILES = {
    **{
        f"dinov2_vit{s}14{reg}": f"{_DINOV2}/dinov2_vit{s}14/dinov2_vit{s}14{reg and '_reg4'}_pretrain.pth"
        for s in ("s", "b", "l")  # g/14 has a SwiGLU MLP: not a ViT of this code (refused by name)
        for reg in ("", "_reg")
    },
    "sam_vit_b": f"{_SAM}/sam_vit_b_01ec64.pth",
    "sam_vit_l": f"{_SAM}/sam_vit_l_0b3195.pth",
    "sam_vit_h": f"{_SAM}/sam_vit_h_4b8939.pth",
}
TORCH_HUB_REPOS = {"facebookresearch/dinov2": "dinov2_", "facebookresearch/segment-anything": "sam_"}

_INPUT_OPTIONS = ("mean", "std", "input_resize")  # the options every format takes (convert.py)
# timm's activation modules -> dmt_jax.models.vit.ACTIVATIONS
_TIMM_ACTS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}


class HubError(UserError, ValueError):
    """A name that cannot be fetched (unknown, not cached and not reachable, not a ViT); one line."""


@dataclasses.dataclass
class Fetched:
    """What convert_checkpoint takes: the weights (a file, or the tensors a library's hub code read), the
    format ('auto': detect it from the file), the options the library knows, and the name for the spec."""

    checkpoint: Any
    fmt: str
    options: dict
    source: str


def is_name(src) -> bool:
    """'timm:...', 'hf-hub:...', 'open_clip:...', 'torchhub:...' that is not an existing file."""
    text = os.fspath(src)
    scheme, colon, rest = text.partition(":")
    return bool(colon and rest) and scheme in SCHEMES and not Path(text).exists()


def fetch(name: str) -> Fetched:
    scheme, _, rest = name.partition(":")
    return {"timm": _timm, "hf-hub": _hf_hub, "open_clip": _open_clip, "torchhub": _torchhub}[scheme](rest)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise HubError(
            f"teachers by name need {module.split('.')[0]} ({e}): pip install -e '.[convert]'"
        ) from e


def _nearest(name: str, known) -> str:
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(near)}?" if near else ""


# ---------------------------------------------------------------- timm and hf-hub


def _timm(model_name: str) -> Fetched:
    _need("timm")
    return _from_timm(model_name, f"timm:{model_name}")


def _hf_hub(repo: str) -> Fetched:
    _need("timm")
    return _from_timm(f"hf-hub:{repo}", f"hf-hub:{repo}")


def _from_timm(timm_name: str, name: str) -> Fetched:
    """timm's own model on the meta device (its architecture and pretrained_cfg, no weights), then its
    weights through timm's hub code."""
    import timm
    import torch
    from timm.models import _hub

    try:
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False)
    except RuntimeError as e:  # unknown model or pretrained tag
        known = timm.list_pretrained() if "." in timm_name else timm.list_models()
        raise HubError(f"{name}: {_first_line(e)}{_nearest(timm_name, known)}") from e
    except OSError as e:  # hf-hub: the repo's config.json neither cached nor reachable
        raise _not_fetched(name, e, timm_name.removeprefix("hf-hub:"), "config.json") from e
    fmt, options = _timm_format(model, name)
    cfg = model.pretrained_cfg
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub_id:
        filename = cfg.get("hf_hub_filename") or "pytorch_model.bin"  # timm tries model.safetensors first
        try:
            weights = _hub.load_state_dict_from_hf(hub_id, filename=filename)
        except Exception as e:  # noqa: BLE001 - sorted by _not_fetched (offline, gone, gated); else raised
            raise _not_fetched(name, e, hub_id, "model.safetensors (or pytorch_model.bin)") from e
        return Fetched(weights, fmt, options, f"{name} (hf-hub:{hub_id})")
    if url:
        path = _torch_hub_file(name, url, Path(_hub.get_cache_dir()))
        return Fetched(str(path), "auto", {k: options[k] for k in _INPUT_OPTIONS}, f"{name} ({url})")
    raise HubError(f"{name}: timm lists no pretrained weights for it (pretrained_cfg has no hub id or url)")


def _timm_format(model, name: str) -> tuple[str, dict]:
    """The format of timm's weights for this model (timm's VisionTransformer: timm; its Eva: eva02) and
    what timm's model says that the tensor shapes cannot (act, ln_eps, num_heads; mean, std, resize).
    What the teacher families do not have is refused here, by name, before any download."""
    cfg = model.pretrained_cfg
    interpolation = cfg.get("interpolation", "bicubic")
    options = dict(
        mean=tuple(float(v) for v in cfg.get("mean", ())),
        std=tuple(float(v) for v in cfg.get("std", ())),
        input_resize=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
    )
    kind, blocks = type(model).__name__, getattr(model, "blocks", None)
    if kind not in ("VisionTransformer", "Eva") or blocks is None:
        raise HubError(f"{name}: a timm {kind}, not a VisionTransformer or Eva: those do not convert")
    if type(model.norm).__name__ == "Identity":  # avg-pool models normalize the pooled vector only
        raise HubError(f"{name}: its tokens have no final LayerNorm (fc_norm on the pooled vector instead)")
    if kind == "Eva":  # timm's Eva names are the eva02 format's own; a token-pooled Eva is a CLIP tower
        return "eva02", options | dict(num_heads=int(blocks[0].attn.num_heads))
    block = blocks[0]
    act = type(getattr(block.mlp, "act", None)).__name__
    if type(block.mlp).__name__ != "Mlp" or act not in _TIMM_ACTS:
        raise HubError(f"{name}: its MLP ({type(block.mlp).__name__} with {act}) is not one this ViT has")
    vit = dict(act=_TIMM_ACTS[act], ln_eps=float(block.norm1.eps), num_heads=int(block.attn.num_heads))
    return "timm", options | vit


# ---------------------------------------------------------------- open_clip


def _open_clip(rest: str) -> Fetched:
    open_clip = _need("open_clip")
    from open_clip import pretrained

    model, slash, tag = rest.rpartition("/")
    name = f"open_clip:{rest}"
    if not slash:
        raise HubError(
            f"{name}: name a model and its weights, open_clip:MODEL/PRETRAINED (e.g. ViT-B-16/openai)"
        )
    cfg = pretrained.get_pretrained_cfg(model, tag)
    if not cfg:
        known = [f"{m}/{t}" for m, t in open_clip.list_pretrained()]
        raise HubError(f"{name}: open_clip has no such pretrained weights{_nearest(rest, known)}")
    vision = (open_clip.get_model_config(model) or {}).get("vision_cfg", {})
    trunk = vision.get("timm_model_name", "vit")
    if isinstance(vision.get("layers"), (list, tuple)) or not trunk.startswith(("vit", "eva02")):
        raise HubError(f"{name}: its image tower is neither a ViT nor an EVA-02 (a ResNet or another trunk)")
    options = dict(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    # OpenAI's weights are format clip (QuickGELU, fixed); the others openclip, whose activation and odd
    # head widths (ViT-bigG-14: 104) the tensors cannot tell: open_clip's own tables say.
    fmt = "clip" if tag == "openai" else "eva02" if trunk.startswith("eva02") else "openclip"
    if fmt == "openclip" and (cfg.get("quick_gelu") or model.endswith("-quickgelu")):
        options["act"] = "quick_gelu"
    if fmt == "openclip" and vision.get("head_width", 64) != 64:
        options["num_heads"] = vision["width"] // vision["head_width"]
    hub_file = cfg.get("hf_hub", "")
    if hub_file:  # 'org/repo/' (open_clip's default file names) or 'org/repo/file'
        repo, filename = os.path.split(hub_file)
        try:
            path = pretrained.download_pretrained(cfg)
        except Exception as e:  # noqa: BLE001 - open_clip wraps the hub's errors in FileNotFoundError
            what = filename or "open_clip_model.safetensors (or open_clip_pytorch_model.bin)"
            raise _not_fetched(name, e, repo, what) from e
        return Fetched(path, fmt, options, f"{name} (hf-hub:{repo})")
    url = cfg.get("url", "")
    path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)  # open_clip's URL cache
    if not path.exists():
        if offline():
            raise HubError(f"{name}: not cached and HF_HUB_OFFLINE=1: download {url} and put it at {path}")
        try:
            path = Path(pretrained.download_pretrained(cfg, prefer_hf_hub=False))
        except OSError as e:
            raise HubError(f"{name}: cannot download {url} ({_first_line(e)}): put it at {path}") from e
    return Fetched(str(path), fmt, options, f"{name} ({url})")


# ---------------------------------------------------------------- torch hub


def _torchhub(rest: str) -> Fetched:
    model = rest.replace(":", "/").rsplit("/", 1)[-1]  # 'facebookresearch/dinov2:dinov2_vitb14' or the model
    repo = rest[: -len(model)].rstrip(":/")
    name = f"torchhub:{rest}"
    if repo and not model.startswith(TORCH_HUB_REPOS.get(repo, "\0")):
        raise HubError(f"{name}: torchhub names here come from {', '.join(TORCH_HUB_REPOS)}")
    if model.startswith("dinov2_vitg14"):
        raise HubError(f"{name}: DINOv2 g/14's SwiGLU MLP is not one this ViT has (s, b, l convert)")
    if model not in TORCH_HUB_FILES:
        raise HubError(f"{name}: not a known torch hub model{_nearest(model, TORCH_HUB_FILES)}")
    import torch

    url = TORCH_HUB_FILES[model]
    path = _torch_hub_file(name, url, Path(torch.hub.get_dir()) / "checkpoints")
    return Fetched(str(path), "auto", {}, f"{name} ({url})")


def _torch_hub_file(name: str, url: str, directory: Path) -> Path:
    """The cached file of `url` in torch hub's layout (directory/basename), downloaded there by torch.hub's
    own code when missing and the network is allowed."""
    path = directory / os.path.basename(url)
    if path.exists():
        return path
    if offline():
        raise HubError(f"{name}: not cached and HF_HUB_OFFLINE=1: download {url} and put it at {path}")
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path))
    except OSError as e:  # URLError: no network, a proxy, a moved file
        raise HubError(
            f"{name}: cannot download {url} ({_first_line(e)}): download it and put it at {path}"
        ) from e
    return path


# ---------------------------------------------------------------- errors


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _not_fetched(name: str, error: BaseException, repo: str, filename: str) -> HubError:
    """One line for a failed Hugging Face fetch: not cached and unreachable (what to download and where the
    cache wants it), no such repo or file, or a gated repo; any other error is re-raised as it is."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cause = error
    while cause is not None and not isinstance(cause, (LocalEntryNotFoundError, EntryNotFoundError,
                                                        RepositoryNotFoundError)):  # fmt: skip
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE=1" if offline() else "the hub cannot be reached"
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        file = filename.split(" ")[0]
        return HubError(
            f"{name}: {repo} is not in the Hugging Face cache ({why}): download "
            f"https://huggingface.co/{repo}/resolve/main/{file} to {folder}/snapshots/local/{file} and write "
            f"'local' into {folder}/refs/main"
        )
    if isinstance(cause, GatedRepoError):
        return HubError(f"{name}: {repo} is gated: accept its terms on huggingface.co and `hf auth login`")
    if isinstance(cause, RepositoryNotFoundError):
        return HubError(f"{name}: the Hugging Face hub has no repository {repo} (or it is private)")
    if isinstance(cause, EntryNotFoundError):
        return HubError(f"{name}: {repo} on the Hugging Face hub has no {filename}")
    raise error
