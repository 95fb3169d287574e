"""Loading a frozen open_clip model: by tag, from a local checkpoint file, or with random weights.

Nothing here touches the network unless weights must be downloaded; with no network (or with
``HF_HUB_OFFLINE=1``) and no cached weights, :func:`load_clip` fails within seconds with a message that
says where to put the file. A tiny 24-block config ``feclip-tiny`` (random weights, milliseconds per
forward) is registered for tests and the demo: it has the depth of ViT-L so every tap set is valid.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from feclip.errors import ConfigError, FEClipError, WeightsNotFoundError

log = logging.getLogger(__name__)

TINY_MODEL = "feclip-tiny"
DEFAULT_MODEL = "ViT-L-14-336-quickgelu"
# The dtypes the backbone's weights can be loaded in (``backbone.precision``): storage, not the compute
# policy of the model (feclip.models.feclip.COMPUTE_PRECISIONS, which a CLIP of any of these runs at).
WEIGHT_PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_WEIGHT_PRECISION = "fp32"  # backbone.precision's default (feclip.config.BackboneConfig)
_CONFIG_DIR = Path(__file__).parent / "configs"
_HF_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TRUE = ("1", "true", "yes", "on")


def _open_clip():
    """Import open_clip and register feclip's model configs once."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)
    return open_clip


def list_models() -> list[str]:
    """Names accepted by :func:`load_clip` (open_clip's built-in configs plus ``feclip-tiny``)."""
    return sorted(_open_clip().list_models())


def is_offline() -> bool:
    """True when the Hugging Face hub is told to stay offline (``HF_HUB_OFFLINE``) or feclip is."""
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "FECLIP_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hf_cache_hint(repo_id: str) -> Path:
    """Where the Hugging Face cache keeps a repository's files (the folder to populate offline)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def find_cached_weights(name: str, tag: str, cache_dir: str | None = None) -> Path | None:
    """Look for a tag's weights in the local caches without any network access."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _open_clip().get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        for fn in [filename] if filename else _HF_FILENAMES:
            hit = try_to_load_from_cache(repo_id, fn, cache_dir=cache_dir)
            if isinstance(hit, str):
                return Path(hit)
    url = cfg.get("url", "")
    if url:  # open_clip's own URL cache: ~/.cache/clip/<file name>
        root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "clip"
        candidate = root / os.path.basename(urlparse(url).path)
        if candidate.is_file():
            return candidate
    return None


def _missing_weights_message(name: str, tag: str, reason: str) -> str:
    cfg = _open_clip().get_pretrained_cfg(name, tag)
    repo_id = os.path.split(cfg.get("hf_hub", ""))[0]
    lines = [
        f"CLIP weights for {name!r} / {tag!r} are not on this machine and cannot be downloaded ({reason})."
    ]
    if repo_id:
        lines.append(
            f"Either put the Hugging Face repository {repo_id!r} in the cache at {hf_cache_hint(repo_id)} "
            f"(on a machine with internet: `huggingface-cli download {repo_id}`, then copy the cache folder, or set HF_HOME)"
        )
    url = cfg.get("url", "")
    if url:
        lines.append(
            f"or download {os.path.basename(urlparse(url).path)} and pass its path: "
            f"load_clip({name!r}, pretrained='/path/to/{os.path.basename(urlparse(url).path)}') "
            f"or `backbone.pretrained=/path/to/file` on the command line."
        )
    return "\n".join(lines)


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original ``.pt`` files are TorchScript archives (a zip holding ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict from ``.safetensors``, ``.bin``/``.pt``/``.pth`` or OpenAI's TorchScript file.

    Pickled files are read with ``weights_only=True`` (no arbitrary objects); TorchScript archives with
    ``torch.jit.load``, which runs no Python pickle code.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    elif _is_torchscript(path):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(key, None)
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise FEClipError(
                f"{path}: not a weights-only PyTorch checkpoint ({type(e).__name__}: {e})"
            ) from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise FEClipError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    if next(iter(sd)).startswith("module."):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


@contextmanager
def _quiet_open_clip(drop_warning: str | None = None):
    """While the block runs, hide open_clip's chatter on the root logger: its INFO records and a
    warning starting with ``drop_warning`` (feclip logs what it did itself)."""

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return drop_warning is None or not str(record.msg).startswith(drop_warning)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_into(model: nn.Module, path: Path) -> None:
    """Load a checkpoint file into an open_clip model (positional embeddings resized if needed)."""
    from open_clip.model import resize_pos_embed

    sd = read_state_dict(path)
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(sd, model)
    # TorchScript archives also carry non-persistent buffers (e.g. the text attention mask)
    transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    sd = {k: v for k, v in sd.items() if k not in transient}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise FEClipError(f"{path}: does not match the model architecture: {str(e).splitlines()[0]}") from e


def locate_weights(
    name: str, pretrained: str | os.PathLike | None, cache_dir: str | None = None
) -> tuple[Path | None, str, bool]:
    """Where ``pretrained`` weights for ``name`` are, without building anything.

    Returns ``(file or None for random weights, source, quick_gelu)``: ``source`` is the open_clip tag,
    ``file:<name>`` for a file, or ``random``; ``quick_gelu`` says whether the weights were trained with
    QuickGELU (OpenAI's). A tag's weights are looked up in the local caches and downloaded only when
    online (never with ``HF_HUB_OFFLINE=1``).

    Raises:
        ConfigError: an unknown model name, or ``pretrained`` neither a tag nor an existing file.
        WeightsNotFoundError: a tag whose weights are not on this machine and cannot be downloaded.
    """
    from feclip.models.provenance import RANDOM

    oc = _open_clip()
    hub_name = name.startswith(("hf-hub:", "local-dir:"))
    if not hub_name and oc.get_model_config(name) is None:
        raise ConfigError(f"unknown CLIP model {name!r}; known names: {', '.join(list_models())}")
    if pretrained is None:
        return None, RANDOM, False
    pretrained = str(pretrained)
    tag_cfg = oc.get_pretrained_cfg(name, pretrained) if not hub_name else {}
    if tag_cfg:
        checkpoint = find_cached_weights(name, pretrained, cache_dir)
        if checkpoint is None:
            if is_offline():
                raise WeightsNotFoundError(
                    _missing_weights_message(name, pretrained, "HF_HUB_OFFLINE is set")
                )
            if not hub_reachable():
                raise WeightsNotFoundError(_missing_weights_message(name, pretrained, "no network"))
            from open_clip.pretrained import download_pretrained

            log.info("downloading %s / %s", name, pretrained)
            checkpoint = Path(download_pretrained(tag_cfg, cache_dir=cache_dir))
        return checkpoint, pretrained, bool(tag_cfg.get("quick_gelu", False))
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, f"file:{path.name}", _is_torchscript(path)  # OpenAI's own release files
    tags = oc.list_pretrained_tags_by_model(name)
    raise ConfigError(
        f"pretrained={pretrained!r} is neither a tag of {name!r} (tags: {tags or 'none'}) nor an existing file"
    )


def load_clip(
    name: str = DEFAULT_MODEL,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    precision: str = DEFAULT_WEIGHT_PRECISION,
    image_size: int | None = None,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Create a frozen open_clip CLIP model in eval mode.

    Args:
        name: an open_clip model name (``open_clip.list_models()``) or ``feclip-tiny``.
        pretrained: an open_clip tag (``"openai"``), a checkpoint file (``.safetensors``, ``.bin``, ``.pt``
            including OpenAI's TorchScript file), or ``None`` for random weights.
        device: where the weights go.
        precision: the dtype of the weights: ``fp32``, ``bf16`` or ``fp16`` (:data:`WEIGHT_PRECISIONS`).
        image_size: input size override (positional embeddings are interpolated), e.g. 518.
        quick_gelu: force QuickGELU; ``None`` decides by itself: OpenAI weights (the tag's config says so,
            or an OpenAI TorchScript file) get the QuickGELU they were trained with.
        cache_dir: cache directory for downloads (default: the Hugging Face cache).
        seed: random weights are drawn from this seed (the caller's random state is left alone);
            ``None`` draws from the global random state (recorded as ``random(seed=None)``).

    Returns the open_clip model with ``requires_grad=False`` everywhere; the attribute
    ``feclip_model_name`` records ``name`` and ``feclip_weights`` the
    :class:`~feclip.models.provenance.WeightsSource` (with the weights file's SHA-256).
    """
    from feclip.models.provenance import WeightsSource, file_sha256

    oc = _open_clip()
    if precision not in WEIGHT_PRECISIONS:
        raise ConfigError(f"precision must be one of {WEIGHT_PRECISIONS}, got {precision!r}")
    checkpoint, source, tag_quick_gelu = locate_weights(name, pretrained, cache_dir)
    # an explicit choice overrides the model config; None follows the weights (OpenAI -> QuickGELU)
    gelu_kwargs = {"force_quick_gelu": tag_quick_gelu} if quick_gelu is None else {"quick_gelu": quick_gelu}

    def create():
        with warnings.catch_warnings(), _quiet_open_clip("No pretrained weights loaded"):
            # weights are loaded below (or deliberately random); open_clip's tag/GELU checks do not apply
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            return oc.create_model(
                name,
                pretrained=None,
                precision="fp32",
                device="cpu",
                force_image_size=image_size,
                **gelu_kwargs,
            )

    if checkpoint is None and seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create()
    else:
        model = create()
    if checkpoint is None:
        log.info("%s: random weights (seed %s)", name, seed)
        weights = WeightsSource(name, source, seed=seed)
    else:
        _load_into(model, checkpoint)
        weights = WeightsSource(name, source, sha256=file_sha256(checkpoint), path=str(checkpoint))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    model.feclip_model_name = name
    model.feclip_weights = weights
    return model
