"""WinCLIP, zero-shot (Jeong et al., CVPR 2023), computed as anomalib's ``WinClipModel`` with ``k_shot=0``.

Reference: anomalib, ``src/anomalib/models/image/winclip/`` (``torch_model.py``, ``utils.py``,
``prompting.py``); docs/peers.md names the commit read, the numbers published and the measured
agreement. Training-free: no parameter of its own, the CLIP frozen.

For images ``(B, 3, S, S)`` over a ViT with a class token, grid ``h x w`` (``P = h * w`` patches):

1. text (once, at construction): the compositional prompt ensemble, every state word (7 normal, 4
   anomalous) in every template (21, one of them twice, as anomalib lists them); each state's sentences
   go through ``encode_text``, the *raw* embeddings are averaged and the mean normalised:
   ``text_embeddings (2, D_text)``, row 0 normal, row 1 anomalous;
2. tokens ``t = [cls, patches] + positional embedding`` ``(B, 1 + P, D)``, before ``ln_pre``;
3. image embedding: ``ln_pre -> transformer -> ln_post -> CLS @ proj`` on all of ``t`` ``(B, D_text)``;
4. window embeddings: for each scale ``k`` and each ``k x k`` window of the grid (stride 1), the class
   token and the window's ``k^2`` patch tokens of ``t`` alone go through the same path: ``(B, W_k, D_text)``;
5. a score is the anomalous probability ``softmax(cos(e, text) / T)[1]``: the image score ``s_img (B,)``
   and the window scores ``(B, W_k)``;
6. per scale, a patch's score is the harmonic mean of the scores of the windows that hold it;
7. the map is the harmonic mean, patch by patch, of ``s_img`` and the per-scale maps ``(B, h, w)``,
   upsampled bilinearly to ``(B, S, S)`` (anomalib builds its map at the input size).

The image score is ``s_img`` alone: in anomalib's zero-shot path the map does not enter it (only the
few-shot path averages the image score with a map maximum); ``s_img`` enters the map as its full-image
scale.

Precision: ``fp32`` runs everything in fp32 (the CLIP's own dtype for a CLIP loaded in fp16/bf16);
``bf16`` runs the visual transformer under bf16 autocast (residual stream fp32, as in
:mod:`feclip.models.feclip`) and never stores the CLIP's weights in another dtype. The head (``ln_post``,
``proj``, cosines, softmax, the harmonic means) is always fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from feclip.errors import ConfigError
from feclip.methods.base import MethodOutput
from feclip.models.feclip import (
    COMPUTE_PRECISIONS,
    check_images,
    class_patch_tokens,
    default_precision,
    layer_norm_fp32,
)
from feclip.models.prompts import NORMAL_STATES, compose_sentences

# The compositional prompt ensemble as anomalib's prompting.py lists it (WinCLIP, Sec. 4.1). The
# template list holds "a jpeg corrupted photo of the {}." twice: that sentence weighs double in the
# mean, as it does in the reference.
WINCLIP_NORMAL_STATES = NORMAL_STATES  # the same 7 phrasings as feclip's ensemble
WINCLIP_ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

MAP_SIZES = ("input", "grid")
# per_window: each window is its own sequence (what anomalib computes with the open_clip its lock file
# installs, 2.24.0). transposed: what the same code computes with open_clip >= 2.26, whose Transformer
# takes batch-first tokens: anomalib's NLD -> LND permute then makes the token axis the batch, attention
# runs across all windows of the batch and every window embedding comes out the same.
WINDOW_LAYOUTS = ("per_window", "transposed")


@dataclass
class WinClipConfig:
    """Every option of WinCLIP that changes a number. Defaults: anomalib's zero-shot defaults."""

    scales: tuple[int, ...] = (2, 3)  # window sizes in patches (anomalib ``scales``)
    window_stride: int = 1  # sliding-window stride in patches (anomalib: make_masks(..., stride=1))
    temperature: float = 0.07  # scores are softmax(cos / temperature)
    object_word: str = "object"  # anomalib ``class_name``: its default when no category is known
    normal_states: tuple[str, ...] = WINCLIP_NORMAL_STATES
    anomalous_states: tuple[str, ...] = WINCLIP_ANOMALOUS_STATES
    templates: tuple[str, ...] = WINCLIP_TEMPLATES
    normalize_prompts: bool = False  # True: L2-normalise each sentence embedding before the mean
    map_size: str = "input"  # input: bilinear to (S, S) as anomalib | grid: the (h, w) map
    window_layout: str = "per_window"  # per_window | transposed (see WINDOW_LAYOUTS)

    def __post_init__(self):
        for name in ("scales", "normal_states", "anomalous_states", "templates"):
            setattr(self, name, tuple(getattr(self, name)))
        self.scales = tuple(int(k) for k in self.scales)

    def validate(self, grid: tuple[int, int] | None = None) -> None:
        """Raise :class:`ConfigError` naming the field and the allowed values."""
        if self.map_size not in MAP_SIZES:
            raise ConfigError(f"winclip.map_size must be one of {MAP_SIZES}, got {self.map_size!r}")
        if self.window_layout not in WINDOW_LAYOUTS:
            raise ConfigError(
                f"winclip.window_layout must be one of {WINDOW_LAYOUTS}, got {self.window_layout!r}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"winclip.temperature must be > 0, got {self.temperature}")
        if self.window_stride < 1:
            raise ConfigError(f"winclip.window_stride must be >= 1, got {self.window_stride}")
        if any(k < 1 for k in self.scales):
            raise ConfigError(f"winclip.scales must be window sizes >= 1, got {list(self.scales)}")
        if grid is not None and any(k > min(grid) for k in self.scales):
            raise ConfigError(
                f"winclip.scales={list(self.scales)}: a window is larger than the {grid[0]}x{grid[1]} token grid"
            )
        for name in ("normal_states", "anomalous_states", "templates"):
            if not getattr(self, name):
                raise ConfigError(f"winclip.{name} must not be empty")


def winclip_prompts(config: WinClipConfig | None = None) -> tuple[list[str], list[str]]:
    """The sentences of each state, ``(normal, anomalous)``: state-major, every template per state."""
    cfg = config or WinClipConfig()
    return (
        compose_sentences(cfg.normal_states, cfg.templates, cfg.object_word),
        compose_sentences(cfg.anomalous_states, cfg.templates, cfg.object_word),
    )


def window_indices(grid: tuple[int, int], size: int, stride: int = 1) -> torch.Tensor:
    """Patch indices (row-major over the grid) of every ``size x size`` sliding window.

    Shape ``(W, size * size)``: windows in row-major order of their top-left corner, a window's patches
    in row-major order. ``W = (floor((h - size) / stride) + 1) * (floor((w - size) / stride) + 1)``.
    """
    h, w = grid
    if size > h or size > w:
        raise ConfigError(f"a {size}x{size} window does not fit in the {h}x{w} token grid")
    ids = torch.arange(h * w).reshape(h, w)
    win = ids.unfold(0, size, stride).unfold(1, size, stride)  # (nh, nw, size, size)
    return win.reshape(-1, size * size)


def harmonic_aggregation(scores: torch.Tensor, windows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows that contain it.

    ``scores (B, W)``, ``windows (W, K)`` patch indices (:func:`window_indices`) -> ``(B, h, w)``.
    A patch in no window gets 0, as in the reference (``nan_to_num``); a zero score makes its patches 0.
    """
    h, w = grid
    b = scores.shape[0]
    flat = windows.reshape(-1).to(scores.device)  # (W*K,) the patch of each (window, slot)
    recip = (1.0 / scores).repeat_interleave(windows.shape[1], dim=1)  # (B, W*K)
    sums = scores.new_zeros(b, h * w).index_add_(1, flat, recip)
    counts = scores.new_zeros(h * w).index_add_(0, flat, torch.ones_like(flat, dtype=scores.dtype))
    return (counts / sums).nan_to_num(posinf=0.0).reshape(b, h, w)


def anomalous_probability(emb: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(cos(emb, text) / temperature)[..., 1]``: emb ``(..., D)``, text ``(2, D)`` -> ``(...)``."""
    cos = F.normalize(emb, dim=-1) @ F.normalize(text, dim=-1).T
    return (cos / temperature).softmax(dim=-1)[..., 1]


def _default_tokenizer(clip: nn.Module):
    """The model's open_clip tokenizer (for CLIP ViTs: the 77-token BPE of anomalib's ``tokenize``)."""
    import open_clip

    from feclip.models.clip import _quiet_open_clip

    name = getattr(clip, "feclip_model_name", None)
    if name is None:
        return open_clip.tokenizer.tokenize
    with _quiet_open_clip():
        return open_clip.get_tokenizer(name)


class WinClip(nn.Module):
    """WinCLIP zero-shot over a frozen open_clip CLIP ViT with a class token (module docstring).

    ``precision``: ``fp32`` | ``bf16`` (module docstring); ``None`` = :func:`default_precision` of the
    CLIP's device (bf16 on CUDA). ``tokenizer``: a callable ``list[str] -> (N, L)`` token ids; ``None``
    takes the model's open_clip tokenizer.
    """

    def __init__(
        self,
        clip: nn.Module,
        config: WinClipConfig | None = None,
        tokenizer=None,
        precision: str | None = None,
    ):
        super().__init__()
        self.config = cfg = config or WinClipConfig()
        visual = clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise ConfigError("WinCLIP needs an open_clip VisionTransformer with a class token")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ConfigError("WinCLIP needs class-token pooling (pool_type='tok', no attentional pooler)")
        if getattr(visual, "final_ln_after_pool", False):
            raise ConfigError("WinCLIP needs ln_post before pooling (final_ln_after_pool=False)")
        self.patch_size = visual.patch_size[0]
        self.image_size = visual.image_size[0]
        self.grid = tuple(visual.grid_size)
        cfg.validate(grid=self.grid)

        self.clip = clip
        clip.requires_grad_(False)
        clip.eval()
        device = next(clip.parameters()).device
        for i, k in enumerate(cfg.scales):
            self.register_buffer(
                f"windows_{i}", window_indices(self.grid, k, cfg.window_stride).to(device), persistent=False
            )
        self.register_buffer("text_embeddings", self._encode_prompts(tokenizer), persistent=False)
        self.set_precision(precision or default_precision(device))

    # -- setup -------------------------------------------------------------------------------------

    def set_precision(self, precision: str) -> WinClip:
        """``fp32`` | ``bf16`` for every later forward; returns self. Raises :class:`ConfigError`."""
        if precision not in COMPUTE_PRECISIONS:
            raise ConfigError(f"precision must be one of {COMPUTE_PRECISIONS}, got {precision!r}")
        self.precision = precision
        return self

    @torch.no_grad()
    def _encode_prompts(self, tokenizer) -> torch.Tensor:
        """``(2, D_text)`` normalised: per state, the mean of the sentence embeddings (raw, or each
        normalised first under ``normalize_prompts``), then L2-normalised."""
        tokenizer = tokenizer or _default_tokenizer(self.clip)
        device = next(self.clip.parameters()).device
        rows = []
        with torch.autocast(device.type, enabled=False):
            for sentences in winclip_prompts(self.config):
                emb = self.clip.encode_text(tokenizer(sentences).to(device)).float()
                if self.config.normalize_prompts:
                    emb = F.normalize(emb, dim=-1)
                rows.append(F.normalize(emb.mean(dim=0), dim=-1))
        return torch.stack(rows)

    def train(self, mode: bool = True) -> WinClip:
        super().train(mode)
        self.clip.eval()  # frozen backbone, never in training mode
        return self

    @property
    def windows(self) -> list[torch.Tensor]:
        """Per scale, the ``(W_k, k*k)`` patch indices of its windows (:func:`window_indices`)."""
        return [getattr(self, f"windows_{i}") for i in range(len(self.config.scales))]

    @property
    def backbone_name(self) -> str | None:
        return getattr(self.clip, "feclip_model_name", None)

    # -- forward -----------------------------------------------------------------------------------

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + class token + positions (before ``ln_pre``). ``(B, 3, S, S) -> (B, 1 + P, D)``;
        fp32 under bf16 (the residual stream stays fp32 under autocast), else as ``conv1`` returns it."""
        check_images(images, self.image_size, self.patch_size)
        v = self.clip.visual
        return class_patch_tokens(v, images, torch.float32 if self.precision == "bf16" else None)

    def encode_cls(self, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """``ln_pre -> transformer -> ln_post -> CLS @ proj`` on token sequences ``(N, L, D) -> (N, D_text)``
        fp32. ``transposed``: the reference's layout under open_clip >= 2.26 (``WINDOW_LAYOUTS``)."""
        v = self.clip.visual
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            x = v.ln_pre(x)
            if transposed:
                x = v.transformer(x.transpose(0, 1)).transpose(0, 1)
            else:
                x = v.transformer(x)  # open_clip >= 2.26: batch-first tokens
        with torch.autocast(x.device.type, enabled=False):
            cls = layer_norm_fp32(v.ln_post, x[:, 0].float())
            return cls @ v.proj.float() if v.proj is not None else cls

    def window_embeddings(self, tokens: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Embeddings of the windows ``(W, K)`` of ``tokens (B, 1 + P, D)``: each window's sequence is
        the class token and its ``K`` patch tokens. Returns ``(B, W, D_text)`` fp32."""
        b, _, d = tokens.shape
        n_win, k = windows.shape
        patches = tokens[:, 1:][:, windows.reshape(-1)].reshape(b, n_win, k, d)
        cls = tokens[:, :1, None].expand(b, n_win, 1, d)
        seq = torch.cat([cls, patches], dim=2).transpose(0, 1).reshape(n_win * b, 1 + k, d)  # window-major
        emb = self.encode_cls(seq, transposed=self.config.window_layout == "transposed")
        return emb.reshape(n_win, b, -1).transpose(0, 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> MethodOutput:
        """images ``(B, 3, S, S)`` CLIP-normalised -> image scores ``(B,)`` and maps ``(B, S, S)``
        (``map_size=grid``: ``(B, h, w)``), fp32, higher = more anomalous."""
        cfg = self.config
        text = self.text_embeddings.float()
        t = self.tokens(images)
        image_scores = anomalous_probability(self.encode_cls(t), text, cfg.temperature)  # (B,)
        b = image_scores.shape[0]
        h, w = self.grid
        per_scale = [image_scores.view(b, 1, 1).expand(b, h, w)]
        for windows in self.windows:
            scores = anomalous_probability(self.window_embeddings(t, windows), text, cfg.temperature)
            per_scale.append(harmonic_aggregation(scores, windows, self.grid))
        maps = len(per_scale) / (1.0 / torch.stack(per_scale)).sum(dim=0)  # (B, h, w)
        if cfg.map_size == "input":
            maps = F.interpolate(maps[:, None], size=tuple(images.shape[-2:]), mode="bilinear")[:, 0]
        return MethodOutput(image_scores=image_scores, maps=maps)
