"""FE-CLIP: a frozen CLIP ViT with frequency adapters at N taps (Gong et al., ICCV 2025).

Forward pass (docs/method.md, "The equations, as computed"), for images ``(B, 3, S, S)`` and a token grid ``h = w = S / patch``:

1. embed: conv1 -> flatten -> prepend the class token -> + positional embedding -> ln_pre;
2. run the frozen resblocks; after each tap block ``n`` replace the patch tokens by
   ``lam * (FFE(f) + LFS(f)) + (1 - lam) * f`` (Eq. 2), the class token untouched;
3. at each tap, the patch path ``fc_patch(ln_post(tokens))`` and the CLS path ``ln_post(cls) @ proj``
   are compared with the normal/abnormal text embeddings (cosine / temperature: the logits of Eq. 1).

The model returns these per-tap logits (and, on request, the fused tap tokens) and nothing derived
from them: :mod:`feclip.scoring` alone turns them into image scores and maps (the 2-way softmax of
Eq. 1, the means over taps of Eq. 3, upsampling, smoothing, the few-shot part).

Blocks after the last tap are never run: nothing downstream of the last tap is used.

Precision (one policy for every path that produces a number: training with or without the prefix
cache, evaluation, few-shot banks and test tokens, ``feclip-predict``): the model owns it
(:attr:`FEClip.precision`, :meth:`FEClip.set_precision`) and applies it inside :meth:`FEClip.prefix`
and :meth:`FEClip.forward_from_prefix`, whatever autocast the caller has open.

* ``bf16`` (the default on CUDA): the matrix products, convolutions and attention of the frozen
  blocks and of the adapters run in bf16 (autocast); the residual stream (the tokens between blocks,
  each block's sums, the adapters' input and the fusion of Eq. 2, what the prefix cache stores) stays
  fp32, and normalisations run in fp32: only the products' outputs are rounded to bf16, never the
  running sum of 24 blocks (a bf16 residual stream moved the demo's image AUROC ten times more;
  BENCHMARKS.md).
  The frozen CLIP's matrices (every Linear, the packed attention projection, the patch embedding)
  are stored in bf16, which gives the same numbers as casting fp32 weights on every forward (autocast
  rounds them the same way) at half the memory and without the casts; LayerNorm weights, the class and
  position embeddings, ``ln_post``, ``proj`` and the text embeddings stay fp32.
* ``fp32`` (the default elsewhere): everything in fp32, autocast disabled inside the model.

Under both, :meth:`FEClip.head` (ln_post, the projections to the text space, the logits) runs in fp32.

Over 400 lines for a reason: the model, its config and the precision policy it applies inside every
forward are one unit (split, each part would need the others' invariants to be read).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from feclip.errors import ConfigError
from feclip.models.adapters import ADAPTER_SETS, LFS_STATS, TapAdapter
from feclip.models.frequency import TRANSFORMS
from feclip.models.prompts import PAPER_PROMPTS, PROMPT_MODES, encode_states, prompt_sentences
from feclip.scoring import abnormal_probability

FC_PATCH_INITS = ("random", "clip_proj")
# The model's compute policy (module docstring; FEClip.precision): not the dtype the backbone's weights
# are loaded in (feclip.models.clip.WEIGHT_PRECISIONS, backbone.precision), which may also be fp16.
COMPUTE_PRECISIONS = ("fp32", "bf16")
AMP_MODES = ("bf16", "none")  # train.amp: bf16 (the model precision on CUDA) | none (fp32); precision_for


def default_precision(device: torch.device | str) -> str:
    """The model precision when none is asked for: ``bf16`` on CUDA, ``fp32`` elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def precision_for(amp: str, device: torch.device | str) -> str:
    """``train.amp`` (``bf16`` | ``none``) on ``device`` -> the model precision: bf16 only on CUDA
    (on the CPU ``train.amp=bf16`` is ignored, as documented in the config)."""
    return "bf16" if amp == "bf16" and torch.device(device).type == "cuda" else "fp32"


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def check_images(images: torch.Tensor, image_size: int, patch_size: int) -> None:
    """Refuse a batch that is not ``(B, 3, S, S)`` at the backbone's ``S = image_size``."""
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (image_size, image_size):
        raise ConfigError(
            f"images must have shape (B, 3, {image_size}, {image_size}) for this backbone "
            f"(a multiple of the patch size {patch_size} fixed when the CLIP was loaded), got {tuple(images.shape)}"
        )


def class_patch_tokens(
    visual: nn.Module,
    images: torch.Tensor,
    dtype: torch.dtype | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """An open_clip ViT's input sequence before ``ln_pre``: patch embedding (``conv1``) cast to ``dtype``
    (None: as ``conv1`` returns it, under the caller's autocast if any), the class token prepended, the
    positional embedding added (``positions``, ``(1 + h*w, D)``: another one, e.g. resized; default the
    CLIP's own). Shape: ``(B, 3, S, S) -> (B, 1 + h*w, D)``."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, D, h, w)
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
    if dtype is not None:
        x = x.to(dtype)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    pos = visual.positional_embedding if positions is None else positions
    return torch.cat([cls, x], dim=1) + pos.to(x.dtype)


def layer_norm_fp32(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``ln`` applied in fp32 (its weights cast), for fp32 ``x`` of any backbone precision."""
    return F.layer_norm(x, ln.normalized_shape, _float(ln.weight), _float(ln.bias), ln.eps)


def is_plain_block(blk: nn.Module) -> bool:
    """open_clip's standard pre-norm block: ln_1 -> self-attention (packed qkv) -> ls_1, ln_2 -> mlp -> ls_2."""
    attn = getattr(blk, "attn", None)
    return (
        type(blk).__name__ == "ResidualAttentionBlock"
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.dropout == 0.0
        and not hasattr(blk, "ln_1_kv")
        and all(hasattr(blk, n) for n in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
    )


def plain_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` on ``(B, L, D)`` tokens, with contiguous projections and
    :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels where available).

    Shape: ``(B, L, D) -> (B, L, D)``.
    """
    attn = blk.attn
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + blk.ls_1(attn.out_proj(o))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def check_zero_based_taps(name: str, taps, depth: int | None) -> None:
    """Refuse, naming the option ``name``, taps outside ``[0, depth - 1]`` (any negative one when
    ``depth`` is None) in one line that says taps are 0-based. A list holding the depth itself reads as
    1-based (AnomalyCLIP's ``--features_list 6 12 18 24``): the error gives its 0-based equivalent."""
    taps = [int(t) for t in taps]
    if depth is None:
        if taps and min(taps) < 0:
            raise ConfigError(f"{name} are 0-based block indices (>= 0), got {taps}")
        return
    if all(0 <= t < depth for t in taps):
        return
    message = (
        f"{name} are 0-based block indices in [0, {depth - 1}] for this {depth}-block backbone, got {taps}"
    )
    if depth in taps:
        message += f"; {depth} is the block count, not an index (the last block is {depth - 1})"
        if min(taps) >= 1 and max(taps) == depth:  # a 1-based list, shifted, fits
            zero_based = ",".join(str(t - 1) for t in taps)  # the override as it is typed
            message += (
                f": if these are 1-based (AnomalyCLIP's --features_list), the 0-based taps are "
                f"{name}=[{zero_based}]"
            )
    raise ConfigError(message)


@dataclass
class FEClipConfig:
    """Every architectural option of FE-CLIP (defaults: the paper preset, docs/method.md).

    ``taps`` are **0-based** indices of the resblocks after which the adapters act: ``0`` is the first
    block, ``depth - 1`` the last (``23`` on ViT-L/14). AnomalyCLIP's ``--features_list`` counts from 1
    (its ``6 12 18 24`` are taps ``(5, 11, 17, 23)`` here); an index equal to the depth, such a
    list's habit, is refused with the 0-based equivalent (:meth:`validate`).
    """

    taps: tuple[int, ...] = (15, 18, 21, 23)  # 0-based resblocks (AnomalyCLIP's list is 1-based)
    lam: float = 0.1  # fusion weight of Eq. 2
    p: int = 3  # FFE window size
    q: int = 3  # LFS sliding window size
    lfs_stat: str = "mean"  # mean | abs | power | log_abs
    lfs_kernel: int = 3  # LFS (and conv-adapter) convolution kernel size
    adapters: str = "both"  # both | ffe | lfs | conv
    transform: str = "dct"  # dct | fft
    temperature: float = 0.07  # tau of Eq. 1 (logits = cos / tau)
    use_clip_logit_scale: bool = False  # use CLIP's learned logit scale instead of 1 / temperature
    fc_patch_init: str = "random"  # random | clip_proj
    prompts: str = "paper"  # paper | ensemble
    normal_prompt: str = PAPER_PROMPTS[0]
    abnormal_prompt: str = PAPER_PROMPTS[1]
    ln_post: bool = True  # apply CLIP's ln_post to patch tokens before fc_patch

    def __post_init__(self):
        self.taps = tuple(int(t) for t in self.taps)

    def validate(self, depth: int | None = None, grid: tuple[int, int] | None = None) -> None:
        """Raise :class:`ConfigError` naming the field and the allowed values."""
        choices = {
            "lfs_stat": LFS_STATS,
            "adapters": ADAPTER_SETS,
            "transform": TRANSFORMS,
            "fc_patch_init": FC_PATCH_INITS,
            "prompts": PROMPT_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.taps:
            raise ConfigError("model.taps must name at least one block")
        if len(set(self.taps)) != len(self.taps) or list(self.taps) != sorted(self.taps):
            raise ConfigError(f"model.taps must be strictly increasing block indices, got {list(self.taps)}")
        check_zero_based_taps("model.taps", self.taps, depth)
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"model.lam must lie in [0, 1], got {self.lam}")
        if self.temperature <= 0:
            raise ConfigError(f"model.temperature must be > 0, got {self.temperature}")
        for name in ("p", "q", "lfs_kernel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.lfs_kernel % 2 == 0:
            raise ConfigError(f"model.lfs_kernel must be odd (same-size convolution), got {self.lfs_kernel}")
        if grid is not None:
            for name in ("p", "q"):
                if getattr(self, name) > min(grid):
                    raise ConfigError(
                        f"model.{name}={getattr(self, name)} is larger than the {grid[0]}x{grid[1]} token grid"
                    )


@dataclass
class FEClipOutput:
    """What :class:`FEClip` returns: the raw per-tap outputs. ``N`` taps, ``B`` images, ``h x w`` token
    grid. Scores and maps are made from them by :mod:`feclip.scoring`."""

    tap_cls_logits: torch.Tensor  # (N, B, 2) normal/abnormal logits of the CLS path, fp32
    tap_patch_logits: torch.Tensor  # (N, B, h, w, 2) normal/abnormal logits of the patch path, fp32
    tap_tokens: torch.Tensor | None = field(default=None)  # (N, B, h, w, D) fused patch tokens, on request

    @property
    def tap_scores(self) -> torch.Tensor:
        """``(N, B)`` per-tap CLS abnormal probability (:func:`feclip.scoring.abnormal_probability`)."""
        return abnormal_probability(self.tap_cls_logits)

    @property
    def tap_maps(self) -> torch.Tensor:
        """``(N, B, h, w)`` per-tap abnormal probability on the token grid (computed when read)."""
        return abnormal_probability(self.tap_patch_logits)


class FEClip(nn.Module):
    """FE-CLIP over a frozen open_clip model (see the module docstring for the forward pass).

    Trainable: ``adapters`` (one :class:`TapAdapter` per tap) and ``fc_patch`` (Linear(D_vision, D_text),
    shared by all taps). The CLIP stays frozen and in eval mode whatever ``train()`` is called with.

    ``precision``: ``fp32`` or ``bf16`` (see the module docstring); ``None`` = :func:`default_precision`
    of the CLIP's device. With ``bf16`` and ``store_frozen`` (default) the CLIP's frozen matrices are
    cast to bf16 in place (the CLIP object passed in changes; a CLIP stored that way cannot run at fp32
    again: load it anew).
    """

    def __init__(
        self,
        clip: nn.Module,
        config: FEClipConfig | None = None,
        tokenizer=None,
        precision: str | None = None,
        store_frozen: bool = True,
    ):
        super().__init__()
        self.config = cfg = config or FEClipConfig()
        visual = clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise ConfigError("FE-CLIP needs an open_clip VisionTransformer with a class token")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ConfigError("FE-CLIP needs class-token pooling (pool_type='tok', no attentional pooler)")
        self.depth = len(visual.transformer.resblocks)
        self.patch_size = visual.patch_size[0]
        self.image_size = visual.image_size[0]
        self.grid = tuple(visual.grid_size)
        cfg.validate(depth=self.depth, grid=self.grid)

        self.clip = clip
        clip.requires_grad_(False)
        clip.eval()
        self.batch_first = getattr(visual.transformer, "batch_first", False)
        self._plain_blocks = all(is_plain_block(b) for b in visual.transformer.resblocks)
        width = visual.conv1.out_channels
        embed_dim = visual.proj.shape[1]
        self.adapters = nn.ModuleDict(
            {
                str(t): TapAdapter(
                    width, cfg.adapters, cfg.lam, cfg.p, cfg.q, cfg.lfs_stat, cfg.lfs_kernel, cfg.transform
                )
                for t in cfg.taps
            }
        )
        self.fc_patch = nn.Linear(width, embed_dim)
        if cfg.fc_patch_init == "clip_proj":
            with torch.no_grad():
                self.fc_patch.weight.copy_(visual.proj.T.float())
                self.fc_patch.bias.zero_()
        ref = next(clip.parameters())
        self.to(device=ref.device)

        normal, abnormal = prompt_sentences(cfg.prompts, cfg.normal_prompt, cfg.abnormal_prompt)
        self.register_buffer("text_embeddings", encode_states(clip, normal, abnormal, tokenizer))
        self.precision = "fp32"
        self.set_precision(precision or default_precision(ref.device), store_frozen)

    # -- precision ---------------------------------------------------------------------------------

    def set_precision(self, precision: str, store_frozen: bool = True) -> FEClip:
        """Choose the compute precision of every forward (module docstring); returns self.

        ``bf16`` with ``store_frozen`` stores the frozen CLIP's matrices in bf16 (once; the same numbers
        as autocast casting fp32 weights). Going back to ``fp32`` after that is refused: the fp32
        weights are gone (load the CLIP again). Raises :class:`ConfigError`.
        """
        if precision not in COMPUTE_PRECISIONS:
            raise ConfigError(f"precision must be one of {COMPUTE_PRECISIONS}, got {precision!r}")
        stored = getattr(self.clip.visual, "feclip_frozen_dtype", None)
        if precision == "fp32" and stored == torch.bfloat16:
            raise ConfigError(
                "this CLIP's frozen weights are stored in bf16 (an FE-CLIP at precision=bf16 cast them); "
                "precision=fp32 needs the CLIP loaded anew"
            )
        if precision == "bf16" and store_frozen and stored != torch.bfloat16:
            with torch.no_grad():
                for p in self._frozen_matrices():
                    p.data = p.data.to(torch.bfloat16)
            self.clip.visual.feclip_frozen_dtype = torch.bfloat16
        self.precision = precision
        return self

    def _frozen_matrices(self) -> list[torch.Tensor]:
        """The frozen visual parameters whose every use autocast casts to bf16: the weights and biases
        of the Linear layers and convolutions and the packed attention projection. LayerNorm and
        LayerScale weights and the class and position embeddings (added to the fp32 stream) stay."""
        v = self.clip.visual
        found = []
        for m in [v.conv1, *v.transformer.modules()]:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                found += [m.weight] + ([m.bias] if m.bias is not None else [])
            elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                found += [m.in_proj_weight] + ([m.in_proj_bias] if m.in_proj_bias is not None else [])
        return found

    @property
    def token_dtype(self) -> torch.dtype:
        """The dtype of the residual stream between blocks (what :meth:`prefix` returns): fp32 under
        both policies (the CLIP's own dtype for a CLIP loaded in bf16 or fp16 at ``precision=fp32``)."""
        return torch.float32 if self.precision == "bf16" else self.clip.visual.conv1.weight.dtype

    def _autocast(self, device_type: str):
        """bf16 autocast under ``precision=bf16``; autocast disabled under fp32 (the caller's is not used)."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # -- bookkeeping -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> FEClip:
        super().train(mode)
        self.clip.eval()  # frozen backbone: never in training mode
        return self

    @property
    def backbone_name(self) -> str | None:
        return getattr(self.clip, "feclip_model_name", None)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter and fc_patch weights (what a checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("adapters.", "fc_patch."))}

    @property
    def backbone_weights(self):
        """The :class:`~feclip.models.provenance.WeightsSource` of the CLIP (None if not from load_clip)."""
        return getattr(self.clip, "feclip_weights", None)

    def checkpoint_metadata(self) -> dict[str, str]:
        """String metadata written beside the weights, used to refuse a mismatched checkpoint and to
        rebuild the backbone the adapters were trained on (``backbone_weights``)."""
        weights = self.backbone_weights
        return {
            "backbone": str(self.backbone_name),
            "backbone_weights": weights.describe() if weights is not None else "",
            "width": str(self.fc_patch.in_features),
            "depth": str(self.depth),
            "image_size": str(self.image_size),
            "taps": json.dumps(list(self.config.taps)),
            "config": json.dumps(asdict(self.config)),
        }

    @property
    def logit_scale(self) -> torch.Tensor | float:
        if self.config.use_clip_logit_scale:
            return self.clip.logit_scale.exp().float()
        return 1.0 / self.config.temperature

    # -- forward -----------------------------------------------------------------------------------

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run resblock ``i`` on batch-first tokens ``(B, L, D)`` whatever layout open_clip uses inside.

        When gradients flow through the block, open_clip's standard block is computed here with its own
        weights (:func:`plain_block`): there ``nn.MultiheadAttention(batch_first=True)`` projects a
        transposed, non-contiguous view, which PyTorch runs as a batched matmul over a broadcast weight
        (1.6x slower forward + backward on the CPU for ViT-L). Without gradients open_clip's block runs
        as it is (its inference fast path), except under ``precision=bf16``, where :func:`plain_block`
        always runs (CUDA's autocast disables that fast path anyway): training and evaluation then run
        the same kernels on the same tokens.
        """
        blk = self.clip.visual.transformer.resblocks[i]
        if self._plain_blocks and (self.precision == "bf16" or (x.requires_grad and torch.is_grad_enabled())):
            return plain_block(blk, x)
        if self.batch_first:
            return blk(x)
        return blk(x.transpose(0, 1)).transpose(0, 1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + class token + positions + ln_pre, in the stream's dtype (:attr:`token_dtype`).
        Shape: ``(B, 3, S, S) -> (B, 1 + h*w, D)``."""
        check_images(images, self.image_size, self.patch_size)
        v = self.clip.visual
        return v.ln_pre(class_patch_tokens(v, images, self.token_dtype))

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the first tap block, before its adapter: independent of every trainable weight.

        Shape: ``(B, 3, S, S) -> (B, 1 + h*w, D)``, dtype :attr:`token_dtype`.
        """
        with self._autocast(images.device.type):
            x = self.embed(images)
            for i in range(self.config.taps[0] + 1):
                x = self._block(i, x)
        return x

    def forward(self, images: torch.Tensor, return_tokens: bool = False) -> FEClipOutput:
        """Shape: images ``(B, 3, S, S)``, CLIP-normalised -> :class:`FEClipOutput`."""
        return self.forward_from_prefix(self.prefix(images), return_tokens=return_tokens)

    def forward_from_prefix(self, x: torch.Tensor, return_tokens: bool = False) -> FEClipOutput:
        """Continue from :meth:`prefix` tokens ``(B, 1 + h*w, D)`` (e.g. served by a cache, in the
        :attr:`token_dtype` it stores them: then the numbers are those of :meth:`forward`)."""
        taps = self.config.taps
        h, w = self.grid
        cls_feats, patch_feats = [], []
        with self._autocast(x.device.type):
            for i in range(taps[0], taps[-1] + 1):
                if i > taps[0]:
                    x = self._block(i, x)
                if i in taps:
                    cls, patches = x[:, :1], x[:, 1:].reshape(x.shape[0], h, w, -1)
                    fused = self.adapters[str(i)](patches)
                    x = torch.cat([cls, fused.reshape(x.shape[0], h * w, -1)], dim=1)
                    cls_feats.append(cls[:, 0])
                    patch_feats.append(fused)
        return self.head(torch.stack(cls_feats), torch.stack(patch_feats), return_tokens)

    def head(self, cls: torch.Tensor, patches: torch.Tensor, return_tokens: bool = False) -> FEClipOutput:
        """Per-tap logits from tap features: cls ``(N, B, D)``, patches ``(N, B, h, w, D)``.

        Always in fp32, whatever autocast or the backbone's precision say: the logits are what the
        metrics rank, and bf16 would round the normal/abnormal margin (a few hundred distinct image
        scores out of thousands). The blocks before it may run in bf16.
        """
        v = self.clip.visual
        with torch.autocast(cls.device.type, enabled=False):
            x_cls, x_patches = cls.float(), patches.float()
            text = self.text_embeddings.float()
            scale = self.logit_scale
            cls_emb = F.normalize(
                layer_norm_fp32(v.ln_post, x_cls) @ v.proj.float(), dim=-1
            )  # (N, B, D_text)
            tokens = layer_norm_fp32(v.ln_post, x_patches) if self.config.ln_post else x_patches
            patch_emb = F.normalize(
                F.linear(tokens, self.fc_patch.weight.float(), _float(self.fc_patch.bias)), dim=-1
            )
            cls_logits = scale * cls_emb @ text.T  # (N, B, 2)
            patch_logits = scale * patch_emb @ text.T  # (N, B, h, w, 2)
        return FEClipOutput(
            tap_cls_logits=cls_logits,
            tap_patch_logits=patch_logits,
            tap_tokens=patches if return_tokens else None,
        )
