"""APRIL-GAN (Chen, Han and Zhang, VAND 2023 challenge report, arXiv 2305.17382) over a frozen open_clip ViT.

What the authors' code (``ByChelsea/VAND-APRIL-GAN``, docs/peers.md) computes, for images
``(B, 3, S, S)``, a token grid ``h = w = S / patch`` and ``N`` taps:

1. the frozen CLIP runs all its blocks on the images (no gradient ever reaches it); after each tap
   block the *raw* residual-stream tokens are kept: no ``ln_post``, no ``proj``, class token dropped;
2. each tap has its own ``Linear(D_vision, D_text)`` (with bias): ``(B, h*w, D) -> (B, h*w, D_text)``,
   L2-normalised, times 100, against the two text features -> ``(B, h*w, 2)`` logits;
3. those 2-channel logits are upsampled to ``S x S`` (bilinear, ``align_corners=True``), *then*
   softmaxed over the two channels: the tap's map is the abnormal channel, and the image's map is the
   **sum** (not the mean) over taps, values in ``[0, N]``, at the input size;
4. the image score is CLIP's own zero-shot score: the final class token through ``ln_post`` and
   ``proj``, L2-normalised, ``softmax(100 * f @ text)`` -> the abnormal probability. It never sees
   the linear layers;
5. the text features come from a prompt ensemble: 7 normal and 5 abnormal state phrasings of the
   category name, each in 35 templates; every sentence embedding is L2-normalised, the mean of a
   state's sentences normalised again -> ``(2, D_text)``, row 0 normal, row 1 abnormal.

Training (the linear layers only) minimises, summed over the taps, a focal loss (gamma 2, label
smoothing 1e-5) on the 2-channel softmax maps at ``S x S`` against the binarised mask plus a dice loss
(smooth 1) on the abnormal channel; the image label is not used.

Precision: ``fp32`` (default) runs everything in fp32 with autocast disabled inside. ``fp16`` or
``bf16`` open an autocast of that dtype around the whole forward and the text encoding, as the
reference does with ``torch.cuda.amp.autocast()`` (fp16) on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from feclip.errors import ConfigError
from feclip.methods.base import MethodOutput
from feclip.models.feclip import check_images, class_patch_tokens
from feclip.models.prompts import ABNORMAL_STATES, NORMAL_STATES, compose_sentences, encode_states

# The reference's prompt ensemble (prompt_ensemble.py): the state phrasings are feclip's ensemble's
# (feclip.models.prompts: the same 7 normal and 5 abnormal), the templates its own, in its order (the
# order only matters through floating-point summation).
TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
PRECISIONS = ("fp32", "fp16", "bf16")
UPSAMPLERS = ("interpolate", "matmul")


def ensemble_sentences(object_word: str) -> tuple[list[str], list[str]]:
    """The reference's sentences for one category: ``(normal, abnormal)``, 7 x 35 and 5 x 35, each
    state phrasing in every template (state-major order, as the reference builds them)."""
    return compose_sentences(NORMAL_STATES, TEMPLATES, object_word), compose_sentences(
        ABNORMAL_STATES, TEMPLATES, object_word
    )


@dataclass
class AprilGanConfig:
    """Everything that changes APRIL-GAN's numbers. Defaults: the reference's zero-shot setting
    (``test_zero_shot.sh``: ViT-L-14-336, features 6 12 18 24, image size 518 set on the backbone)."""

    taps: tuple[int, ...] = (5, 11, 17, 23)  # 0-based blocks (the reference's 1-based 6, 12, 18, 24)
    logit_scale: float = 100.0  # the fixed 100 of the reference (patch maps and image score), not CLIP's
    # the prompts name each image's category (forward's class_names), as the reference does; without
    # names, or with class_names=False, every image gets object_word
    class_names: bool = True
    object_word: str = "object"
    # how the 2-channel logits reach S x S (bilinear, align_corners=True, both): the reference's
    # F.interpolate, or the same resize as two matrix products (equal within fp32 rounding; a
    # deterministic backward on CUDA, which F.interpolate's is not)
    upsample: str = "interpolate"
    # the reference's training loss (loss.py): focal gamma and label smoothing, dice smoothing
    focal_gamma: float = 2.0
    focal_smooth: float = 1e-5
    dice_smooth: float = 1.0
    # the reference's batch of ONE image: its mask.squeeze() also drops the batch axis, and its dice
    # loss then takes each of the S mask rows for an image (the mean of S per-row dice losses). Off: a
    # batch of one is one image, as any other batch (the reference's own runs never met the case)
    dice_rows_for_one_image: bool = False

    def __post_init__(self):
        self.taps = tuple(int(t) for t in self.taps)

    def validate(self, depth: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the field and the allowed values."""
        if not self.taps:
            raise ConfigError("aprilgan.taps must name at least one block")
        if list(self.taps) != sorted(set(self.taps)):
            raise ConfigError(
                f"aprilgan.taps must be strictly increasing block indices, got {list(self.taps)}"
            )
        if depth is not None and not all(0 <= t < depth for t in self.taps):
            raise ConfigError(
                f"aprilgan.taps must lie in [0, {depth - 1}] for this {depth}-block backbone, got {list(self.taps)}"
            )
        if self.upsample not in UPSAMPLERS:
            raise ConfigError(f"aprilgan.upsample must be one of {UPSAMPLERS}, got {self.upsample!r}")
        if self.logit_scale <= 0:
            raise ConfigError(f"aprilgan.logit_scale must be > 0, got {self.logit_scale}")
        if not 0 <= self.focal_smooth <= 1:
            raise ConfigError(f"aprilgan.focal_smooth must lie in [0, 1], got {self.focal_smooth}")


def _dice_loss(*args, **kwargs) -> torch.Tensor:
    """:func:`feclip.losses.dice_loss` (imported here: feclip.losses imports feclip.config, which
    imports this module's config)."""
    from feclip.losses import dice_loss

    return dice_loss(*args, **kwargs)


def align_corners_matrix(n_in: int, n_out: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(n_out, n_in)`` matrix of 1-D linear resizing with ``align_corners=True`` (output ``i``
    samples input position ``i * (n_in - 1) / (n_out - 1)``)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = i * scale
        i0 = min(int(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    return m.to(device=device, dtype=torch.float32)


def focal_on_probabilities(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """The reference's focal loss on 2-channel probabilities, mean over every pixel.

    With ``q`` the one-hot target clamped to ``[smooth, 1 - smooth]``: ``pt = sum_c q_c p_c + smooth``,
    loss ``-(1 - pt)^gamma log(pt)``. Shape: probs ``(B, 2, H, W)``, target ``(B, H, W)`` in {0, 1}
    -> scalar.
    """
    t = target.to(probs.dtype)
    onehot = torch.stack([1 - t, t], dim=1).clamp(smooth, 1.0 - smooth)
    pt = (onehot * probs).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


class AprilGan(nn.Module):
    """APRIL-GAN over a frozen open_clip CLIP with a class token (module docstring).

    Trainable: ``fc`` (one ``Linear(D_vision, D_text)`` per tap; ``fc.<i>.weight`` / ``fc.<i>.bias``,
    the keys of the reference's ``trainable_linearlayer`` checkpoints). The CLIP stays frozen and in
    eval mode whatever ``train()`` is called with.
    """

    def __init__(
        self,
        clip: nn.Module,
        config: AprilGanConfig | None = None,
        tokenizer=None,
        precision: str = "fp32",
    ):
        super().__init__()
        self.config = cfg = config or AprilGanConfig()
        visual = clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise ConfigError("APRIL-GAN needs an open_clip VisionTransformer with a class token")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ConfigError("APRIL-GAN needs class-token pooling (pool_type='tok', no attentional pooler)")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.depth = len(visual.transformer.resblocks)
        cfg.validate(depth=self.depth)
        self.patch_size = visual.patch_size[0]
        self.image_size = visual.image_size[0]
        self.grid = tuple(visual.grid_size)
        self.precision = precision
        self.clip = clip
        clip.requires_grad_(False)
        clip.eval()
        self.batch_first = getattr(visual.transformer, "batch_first", False)
        width, embed_dim = visual.conv1.out_channels, visual.proj.shape[1]
        self.fc = nn.ModuleList([nn.Linear(width, embed_dim) for _ in cfg.taps])
        device = next(clip.parameters()).device
        self.fc.to(device)
        self.tokenizer = tokenizer
        self._class_text: dict[str, torch.Tensor] = {}  # category name -> (2, D_text), computed once
        self.register_buffer("text_features", self.encode_text(cfg.object_word))

    # -- bookkeeping -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> AprilGan:
        super().train(mode)
        self.clip.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The linear layers' weights: ``fc.<i>.weight`` ``(D_text, D_vision)`` and ``fc.<i>.bias``."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("fc.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state_dict` weights, or a reference checkpoint's dict (its
        ``{"trainable_linearlayer": ...}`` as ``torch.load`` reads it: the same keys)."""
        state = state.get("trainable_linearlayer", state)
        self.fc.load_state_dict({k.removeprefix("fc."): v for k, v in state.items()}, strict=True)

    def _autocast(self, device_type: str):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)

    # -- text --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, object_word: str) -> torch.Tensor:
        """The ensemble's state features for one category name: ``(2, D_text)``, rows L2-normalised."""
        normal, abnormal = ensemble_sentences(object_word)
        device = next(self.clip.parameters()).device
        with self._autocast(device.type):
            return encode_states(self.clip, normal, abnormal, self.tokenizer)

    def text_for(self, class_names: Sequence[str] | None, batch: int) -> torch.Tensor:
        """Each image's text features ``(B, 2, D_text)``: its category's (``class_names``) or
        ``object_word``'s for every image (no names, or ``config.class_names=False``)."""
        if class_names is None or not self.config.class_names:
            return self.text_features.float().expand(batch, -1, -1)
        if len(class_names) != batch:
            raise ConfigError(f"{len(class_names)} class names for a batch of {batch} images")
        for name in set(class_names) - set(self._class_text):
            self._class_text[name] = self.encode_text(name)
        dev = self.text_features.device
        return torch.stack([self._class_text[n].to(dev).float() for n in class_names])

    # -- forward -----------------------------------------------------------------------------------

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.clip.visual.transformer.resblocks[i]
        return blk(x) if self.batch_first else blk(x.transpose(0, 1)).transpose(0, 1)

    @torch.no_grad()
    def backbone(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen CLIP, without gradients: ``(B, 3, S, S)`` -> (the final class token through
        ``ln_post`` and ``proj``, ``(B, D_text)``; the raw tap tokens without the class token,
        ``(N, B, h*w, D)``)."""
        v = self.clip.visual
        check_images(images, self.image_size, v.patch_size[0])
        x = v.ln_pre(class_patch_tokens(v, images))  # (B, 1 + h*w, D), in conv1's output dtype
        taps = []
        for i in range(self.depth):
            x = self._block(i, x)
            if i in self.config.taps:
                taps.append(x[:, 1:])
        return v.ln_post(x[:, 0]) @ v.proj, torch.stack(taps)

    def _upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """``(..., h, w)`` -> ``(..., S, S)``, bilinear with ``align_corners=True``."""
        size = (self.image_size, self.image_size)
        if self.config.upsample == "interpolate":
            lead = logits.shape[:-2]
            flat = logits.reshape(-1, 2, *logits.shape[-2:])
            out = F.interpolate(flat, size=size, mode="bilinear", align_corners=True)
            return out.reshape(*lead, *size)
        rows = align_corners_matrix(logits.shape[-2], size[0], logits.device).to(logits.dtype)
        cols = align_corners_matrix(logits.shape[-1], size[1], logits.device).to(logits.dtype)
        return rows @ logits @ cols.T

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Shape: images ``(B, 3, S, S)`` (CLIP-normalised), ``class_names`` one category name per image
        (optional) -> :class:`MethodOutput`: ``image_scores (B,)``, ``maps (B, S, S)`` in ``[0, N]``,
        ``terms["tap_probs"] (N, B, 2, S, S)`` (per-tap softmax maps, what :meth:`loss` reads) and
        ``terms["image_logits"] (B, 2)``.
        """
        b = images.shape[0]
        h, w = self.grid
        scale = self.config.logit_scale
        with self._autocast(images.device.type):
            image_features, tokens = self.backbone(images)
            text = self.text_for(class_names, b).to(images.device)  # (B, 2, D_text)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            image_logits = scale * torch.einsum("bd,bkd->bk", image_features, text)
            maps = []
            for n, fc in enumerate(self.fc):
                patches = fc(tokens[n])  # (B, h*w, D_text)
                patches = patches / patches.norm(dim=-1, keepdim=True)
                logits = scale * torch.einsum("bld,bkd->bkl", patches, text)  # (B, 2, h*w)
                maps.append(torch.softmax(self._upsample(logits.reshape(b, 2, h, w)), dim=1))
            tap_probs = torch.stack(maps)  # (N, B, 2, S, S)
        return MethodOutput(
            image_scores=torch.softmax(image_logits.float(), dim=-1)[:, 1],
            maps=tap_probs[:, :, 1].float().sum(0),
            terms={"tap_probs": tap_probs, "image_logits": image_logits.float()},
        )

    def loss(
        self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reference's training loss: ``sum_n [Focal(P_n, G) + Dice(P_n[:, 1], G)]`` over the taps,
        ``P_n`` the tap's 2-channel softmax map at ``S x S`` and ``G = masks > 0.5``.

        ``config.dice_rows_for_one_image`` reproduces the reference's dice for a batch of one image
        (per mask row). Shapes: masks ``(B, S, S)``; ``labels`` ``(B,)`` is accepted and not read (the reference's loss
        does not use the image label). Returns ``(total, {"focal", "dice", "total"})``, the parts
        detached sums over the taps.
        """
        cfg = self.config
        target = (masks > 0.5).float()
        focal = dice = 0.0
        for probs in output.terms["tap_probs"]:
            probs = probs.float()
            focal = focal + focal_on_probabilities(probs, target, cfg.focal_gamma, cfg.focal_smooth)
            if cfg.dice_rows_for_one_image and target.shape[0] == 1:
                dice = dice + _dice_loss(probs[0, 1][:, None], target[0][:, None], smooth=cfg.dice_smooth)
            else:
                dice = dice + _dice_loss(probs[:, 1], target, smooth=cfg.dice_smooth)
        total = focal + dice
        return total, {"focal": focal.detach(), "dice": dice.detach(), "total": total.detach()}
