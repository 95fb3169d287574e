"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic prompt learning over a frozen CLIP.

Reference: ``zqhang/AnomalyCLIP`` (train.py, test.py, prompt_ensemble.py, AnomalyCLIP_lib/, loss.py);
docs/peers.md lists the commit read, the published numbers and every difference.

What is learned (nothing of the CLIP):

* ``ctx_pos`` / ``ctx_neg`` ``(1, 1, n_ctx, W)``: the ``n_ctx`` word embeddings that replace the
  placeholders of the two sentences ``"X X ... X object."`` (normal) and ``"X X ... X damaged object."``
  (abnormal), ``W`` the text width;
* ``compound_prompts_text`` (``depth - 1`` tensors ``(t_n_ctx, W)``): deep text tokens; before text
  layer ``i`` (``1 <= i <= depth - 1``, 0-based) the tokens at positions ``1 .. t_n_ctx`` are *replaced*
  by tensor ``i - 1`` (the reference casts them to fp16 first: ``deep_prompts_fp16``). Layers beyond the
  text tower's depth do not exist, so their tensors stay unused (as in the reference).

The forward pass, for images ``(B, 3, S, S)`` and a token grid ``h = w = S / patch``:

1. embed: conv1 -> class token -> positions (bilinearly resized when ``S`` is not the CLIP's own size,
   as the reference does) -> ln_pre;
2. the frozen blocks; from block ``s = depth_v - (dpam_layer - 1)`` on (DPAM), each block also computes
   V-V self-attention ``softmax(v v^T / sqrt(d_head)) v`` on the *original* path's ``ln_1`` tokens; the
   DPAM path accumulates these attention outputs only (no MLP): ``x_dpam = x_s + sum_{j>=s} attn_vv_j``,
   while the original path runs the blocks unchanged;
3. at each tap block the tokens (DPAM path from ``s`` on) go through ``ln_post`` and ``proj`` and are
   compared with the two text embeddings: ``softmax(cos / 0.07)`` over (normal, abnormal) per token;
4. image score: ``softmax(cos(CLS_orig_last @ proj, text) / 0.07)[abnormal]`` -- the class token of the
   original path after the last block, *without* ``ln_post`` (as the reference computes it;
   ``cls_ln_post`` adds it);
5. map: per tap ``(p_abnormal + 1 - p_normal) / 2`` upsampled bilinearly to ``S x S``, summed over taps
   (test.py; its Gaussian ``sigma = 4`` is the engine's smoothing, ``eval.sigma``, not applied here).

Loss (train.py): ``lam * sum_taps [Focal(P_t, G) + Dice(P_t[abn], G) + Dice(P_t[nor], 1 - G)] +
CE(image logits, y)`` with ``P_t`` the tap's two-class probabilities upsampled to the mask size.

Depth-dependent settings are given for the reference's 24-block ViT-L and scaled to other depths when
left ``None`` (:meth:`AnomalyClipConfig.resolved`): block ``k`` (1-based) of 24 becomes block
``round(k * depth / 24)``.

Precision: ``fp32`` (default off CUDA): everything fp32. ``bf16`` (default on CUDA): the frozen visual
blocks' products run under bf16 autocast with an fp32 residual stream; the text tower, the similarities,
the maps and the loss always run in fp32 (the text tower in the CLIP's weight dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from feclip.errors import ConfigError
from feclip.methods.base import MethodOutput
from feclip.models.feclip import (
    COMPUTE_PRECISIONS,
    class_patch_tokens,
    default_precision,
    is_plain_block,
    layer_norm_fp32,
    plain_block,
)

REFERENCE_DEPTH = 24  # the reference's backbone (ViT-L/14@336px) has 24 visual blocks
REFERENCE_DPAM_LAYER = 20  # DPAM_layer: V-V attention in the last 19 blocks (6..24, 1-based)
REFERENCE_TAPS = (24,)  # 1-based: the published runs (train.sh / test.sh: --features_list 24)
REFERENCE_MULTI_TAPS = (6, 12, 18, 24)  # 1-based: train.py's / test.py's argparse default
FOCAL_GAMMA = 2.0  # loss.FocalLoss defaults (alpha = 1 for both classes)
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0  # loss.BinaryDiceLoss


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`feclip.losses.bilinear_upsample` (imported here: feclip.losses imports feclip.config,
    which imports this module's config)."""
    from feclip.losses import bilinear_upsample

    return bilinear_upsample(maps, size)


def scale_block(one_based: int, depth: int, reference_depth: int = REFERENCE_DEPTH) -> int:
    """Block ``one_based`` (1-based) of a ``reference_depth``-block model -> the 0-based index of the
    block at the same relative depth of a ``depth``-block model (``round(k * depth / ref) - 1``, at
    least 0). ``scale_block(24, 24) == 23``, ``scale_block(6, 12) == 2``."""
    return max(int(round(one_based * depth / reference_depth)) - 1, 0)


@dataclass
class AnomalyClipConfig:
    """AnomalyCLIP's options; defaults = the reference's zero-shot setting (train.sh / test.sh)."""

    n_ctx: int = 12  # learnable word embeddings per sentence (--n_ctx)
    depth: int = 9  # text layers with learnable tokens: layer 0's are ctx_*, layers 1..depth-1 deep (--depth)
    t_n_ctx: int = 4  # deep tokens per layer (--t_n_ctx)
    dpam_layer: int | None = None  # V-V attention in the last dpam_layer - 1 blocks; None: 20 of 24, scaled
    taps: tuple[int, ...] | None = None  # 0-based tap blocks; None: the top block (REFERENCE_TAPS, scaled)
    temperature: float = 0.07  # cos / temperature, for the maps and the image logits
    lam: float = 4.0  # weight of the map losses (train.py: lam = 4)
    object_word: str = "object"  # the object-agnostic class name
    abnormal_state: str = "damaged {}"  # the abnormal sentence's state template (normal: "{}")
    deep_prompts_fp16: bool = True  # the reference rounds the deep tokens to fp16 (``.half()``) each forward
    cls_ln_post: bool = False  # apply ln_post to the image CLS feature (the reference does not)

    def __post_init__(self):
        if self.taps is not None:
            self.taps = tuple(int(t) for t in self.taps)

    def resolved(self, vision_depth: int) -> AnomalyClipConfig:
        """A copy with ``taps`` and ``dpam_layer`` filled in for a ``vision_depth``-block backbone:
        ``None`` becomes the reference's value scaled to that depth (:func:`scale_block`): taps
        ``(23,)`` and ``dpam_layer = 20`` at depth 24, ``(11,)`` and ``11`` at depth 12."""
        taps = self.taps
        if taps is None:
            taps = tuple(scale_block(k, vision_depth) for k in REFERENCE_TAPS)
        dpam = self.dpam_layer
        if dpam is None:
            n_vv = int(round((REFERENCE_DPAM_LAYER - 1) * vision_depth / REFERENCE_DEPTH))
            dpam = n_vv + 1
        return replace(self, taps=tuple(taps), dpam_layer=int(dpam))

    def validate(self, vision_depth: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the field and what is allowed."""
        for name in ("n_ctx", "depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"anomalyclip.{name} must be >= 1, got {getattr(self, name)}")
        if self.depth > 1 and self.t_n_ctx < 1:
            raise ConfigError(f"anomalyclip.t_n_ctx must be >= 1 when depth > 1, got {self.t_n_ctx}")
        if self.temperature <= 0:
            raise ConfigError(f"anomalyclip.temperature must be > 0, got {self.temperature}")
        if self.lam < 0:
            raise ConfigError(f"anomalyclip.lam must be >= 0, got {self.lam}")
        if "{}" not in self.abnormal_state:
            raise ConfigError(f"anomalyclip.abnormal_state must contain '{{}}', got {self.abnormal_state!r}")
        if self.taps is not None:
            if not self.taps or list(self.taps) != sorted(set(self.taps)):
                raise ConfigError(
                    f"anomalyclip.taps must be strictly increasing block indices, got {self.taps}"
                )
            if vision_depth is not None and not all(0 <= t < vision_depth for t in self.taps):
                raise ConfigError(
                    f"anomalyclip.taps must lie in [0, {vision_depth - 1}] for this backbone, got {self.taps}"
                )
        if self.dpam_layer is not None:
            top = vision_depth + 1 if vision_depth is not None else None
            if self.dpam_layer < 1 or (top is not None and self.dpam_layer > top):
                raise ConfigError(
                    f"anomalyclip.dpam_layer must lie in [1, {top or 'depth + 1'}] (1 = no DPAM), got {self.dpam_layer}"
                )


def dpam_attention(blk: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two attentions of a DPAM block on its ``ln_1`` tokens ``h`` ``(B, L, D)``, with the block's own
    packed projection: ``(V-V attention, ordinary q-k attention)``, each after ``out_proj``.

    V-V attention: ``softmax(v v^T * d_head^-0.5) v`` per head (q and k replaced by v). Shapes:
    ``(B, L, D) -> ((B, L, D), (B, L, D))``.
    """
    attn = blk.attn
    b, n, d = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
    o_vv = F.scaled_dot_product_attention(v, v, v).transpose(1, 2).reshape(b, n, d)
    o_qk = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    return attn.out_proj(o_vv), attn.out_proj(o_qk)


def focal_loss_reference(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.FocalLoss on class probabilities ``(B, 2, H, W)`` and a 0/1 mask ``(B, H, W)``.

    ``p_t = sum_c clamp(onehot_c, s, 1 - s) * p_c + s`` (``s = 1e-5``), ``-(1 - p_t)^2 log p_t``, mean over
    all pixels. Shape -> scalar.
    """
    probs, target = probs.float(), target.float()
    onehot = torch.stack([1 - target, target], dim=1).clamp(FOCAL_SMOOTH, 1 - FOCAL_SMOOTH)
    pt = (onehot * probs).sum(1) + FOCAL_SMOOTH
    return (-((1 - pt) ** FOCAL_GAMMA) * pt.log()).mean()


def dice_loss_reference(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.BinaryDiceLoss: ``1 - mean_b (2 sum(p g) + 1) / (sum p + sum g + 1)``. ``(B, H, W)`` -> scalar."""
    p, g = prob.float().flatten(1), target.float().flatten(1)
    return 1 - ((2 * (p * g).sum(1) + DICE_SMOOTH) / (p.sum(1) + g.sum(1) + DICE_SMOOTH)).mean()


class AnomalyClip(nn.Module):
    """AnomalyCLIP over a frozen open_clip CLIP ViT with a class token (module docstring).

    Trainable: ``ctx_pos``, ``ctx_neg``, ``compound_prompts_text`` (named as in the reference's
    ``prompt_learner``, so its checkpoints load with :meth:`load_trainable_state_dict`).
    """

    def __init__(
        self,
        clip: nn.Module,
        config: AnomalyClipConfig | None = None,
        tokenizer=None,
        precision: str | None = None,
    ):
        super().__init__()
        visual = clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise ConfigError("AnomalyCLIP needs an open_clip VisionTransformer with a class token")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ConfigError(
                "AnomalyCLIP needs class-token pooling (pool_type='tok', no attentional pooler)"
            )
        if getattr(clip, "text_pool_type", "argmax") != "argmax":
            raise ConfigError("AnomalyCLIP needs a text tower pooled at the end-of-text token (argmax)")
        self.vision_depth = len(visual.transformer.resblocks)
        config = config or AnomalyClipConfig()
        config.validate(self.vision_depth)
        self.config = cfg = config.resolved(self.vision_depth)
        cfg.validate(self.vision_depth)
        self.dpam_start = self.vision_depth - (cfg.dpam_layer - 1)  # first block with V-V attention
        blocks = visual.transformer.resblocks
        if not all(is_plain_block(blocks[i]) for i in range(self.dpam_start, self.vision_depth)):
            raise ConfigError("DPAM needs open_clip's standard blocks (packed qkv projection with bias)")
        self.patch_size = visual.patch_size[0]
        self.image_size = visual.image_size[0]
        self.clip = clip
        clip.requires_grad_(False)
        clip.eval()
        if precision is None:
            precision = default_precision(next(clip.parameters()).device)
        if precision not in COMPUTE_PRECISIONS:
            raise ConfigError(f"precision must be one of {COMPUTE_PRECISIONS}, got {precision!r}")
        self.precision = precision

        width = clip.ln_final.weight.shape[0]
        dtype = clip.transformer.get_cast_dtype()
        device = clip.ln_final.weight.device
        # drawn in the reference's order: ctx_pos, ctx_neg, then the deep tokens (normal, std 0.02)
        ctx_pos = torch.empty(1, 1, cfg.n_ctx, width, dtype=dtype, device=device)
        ctx_neg = torch.empty(1, 1, cfg.n_ctx, width, dtype=dtype, device=device)
        nn.init.normal_(ctx_pos, std=0.02)
        nn.init.normal_(ctx_neg, std=0.02)
        self.ctx_pos = nn.Parameter(ctx_pos)
        self.ctx_neg = nn.Parameter(ctx_neg)
        self.compound_prompts_text = nn.ParameterList(
            [
                nn.Parameter(nn.init.normal_(torch.empty(cfg.t_n_ctx, width, device=device), std=0.02))
                for _ in range(cfg.depth - 1)
            ]
        )

        tokens = self.tokenize(self.prompt_sentences(), tokenizer).to(device)  # (2, context)
        if (tokens.argmax(-1) <= cfg.n_ctx + 1).any() or (tokens[:, -1] != 0).any():
            raise ConfigError(f"anomalyclip.n_ctx={cfg.n_ctx}: the prompts do not fit the text context")
        with torch.no_grad():
            emb = clip.token_embedding(tokens).to(dtype)  # (2, context, W)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)  # start-of-text
        self.register_buffer("token_suffix", emb[:, 1 + cfg.n_ctx :].clone(), persistent=False)

    # -- prompts -----------------------------------------------------------------------------------

    def prompt_sentences(self) -> list[str]:
        """The two sentences whose ``X`` placeholders the learnable embeddings replace: normal, abnormal."""
        cfg = self.config
        prefix = " ".join(["X"] * cfg.n_ctx)
        return [f"{prefix} {cfg.object_word}.", f"{prefix} {cfg.abnormal_state.format(cfg.object_word)}."]

    def tokenize(self, sentences: list[str], tokenizer=None) -> torch.Tensor:
        """Token ids ``(len(sentences), context)`` with open_clip's tokenizer for this CLIP (or ``tokenizer``)."""
        if tokenizer is None:
            import open_clip

            from feclip.models.clip import _open_clip, _quiet_open_clip

            _open_clip()  # registers feclip's configs (the tiny CLIP's context length)
            with _quiet_open_clip():
                tokenizer = open_clip.get_tokenizer(getattr(self.clip, "feclip_model_name", "ViT-L-14"))
        return tokenizer(sentences).long()

    def text_features(self) -> torch.Tensor:
        """The normal and abnormal text embeddings, L2-normalised, fp32: ``(2, D_text)``.

        The text tower runs in the CLIP's weight dtype with autocast off; gradients reach the prompts.
        """
        clip, cfg = self.clip, self.config
        w = self.ctx_pos.shape[-1]
        ctx = torch.cat([self.ctx_pos.reshape(-1, cfg.n_ctx, w), self.ctx_neg.reshape(-1, cfg.n_ctx, w)])
        dtype = self.token_prefix.dtype
        with torch.autocast(self.token_prefix.device.type, enabled=False):
            x = torch.cat([self.token_prefix, ctx.to(dtype), self.token_suffix], dim=1)  # (2, L, W)
            x = x + clip.positional_embedding.to(dtype)
            transformer = clip.transformer
            for i, blk in enumerate(transformer.resblocks):
                if 1 <= i <= len(self.compound_prompts_text):  # replace the previous layer's tokens
                    deep = self.compound_prompts_text[i - 1].expand(x.shape[0], -1, -1)
                    if cfg.deep_prompts_fp16:  # expanded first: the gradient is rounded per sentence
                        deep = deep.half()
                    deep = deep.to(x.dtype)
                    x = torch.cat([x[:, :1], deep, x[:, 1 + cfg.t_n_ctx :]], dim=1)
                if getattr(transformer, "batch_first", True):
                    x = blk(x, attn_mask=clip.attn_mask)
                else:
                    x = blk(x.transpose(0, 1), attn_mask=clip.attn_mask).transpose(0, 1)
            x = clip.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), self.tokenized_prompts.argmax(dim=-1)]
            proj = clip.text_projection
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    # -- vision ------------------------------------------------------------------------------------

    def _autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """conv1 + class token + positions + ln_pre: ``(B, 3, S, S) -> (B, 1 + h*w, D)``.

        For an ``S`` other than the CLIP's own size, the positional embedding of the patches is resized
        bilinearly (``align_corners=False``), as the reference does.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
            raise ConfigError(f"images must have shape (B, 3, S, S), got {tuple(images.shape)}")
        if images.shape[-1] % self.patch_size:
            raise ConfigError(
                f"the image size {images.shape[-1]} is not a multiple of the patch {self.patch_size}"
            )
        v = self.clip.visual
        # the stream's dtype: fp32 under bf16 (autocast is on around this), else the CLIP's (it is off)
        dtype = torch.float32 if self.precision == "bf16" else v.conv1.weight.dtype
        side_new = images.shape[-1] // self.patch_size  # the token grid's side
        pos = v.positional_embedding.to(dtype)
        side = int(round((pos.shape[0] - 1) ** 0.5))
        if side != side_new:
            grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, (side_new, side_new), mode="bilinear")
            pos = torch.cat([pos[:1], grid.flatten(2)[0].T], dim=0)
        return v.ln_pre(class_patch_tokens(v, images, dtype, positions=pos))

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.clip.visual.transformer.resblocks[i]
        if is_plain_block(blk):
            return plain_block(blk, x)
        if getattr(self.clip.visual.transformer, "batch_first", True):
            return blk(x)
        return blk(x.transpose(0, 1)).transpose(0, 1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen visual path: ``(image features (B, D_text), tap tokens (N, B, 1 + h*w, D_text))``,
        both projected by ``proj`` and fp32, not normalised (taps: ``ln_post`` then ``proj``)."""
        cfg, v = self.config, self.clip.visual
        taps, tap_tokens = set(cfg.taps), []
        with self._autocast(images.device.type):
            x = self.embed(images)
            x_dpam = None
            for i in range(self.vision_depth):
                blk = v.transformer.resblocks[i]
                if i < self.dpam_start:
                    x = self._block(i, x)
                else:
                    a_vv, a_qk = dpam_attention(blk, blk.ln_1(x))
                    x_dpam = (x if x_dpam is None else x_dpam) + blk.ls_1(a_vv)  # no MLP on this path
                    x = x + blk.ls_1(a_qk)
                    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
                if i in taps:
                    tap_tokens.append(x_dpam if i >= self.dpam_start else x)
        with torch.autocast(images.device.type, enabled=False):
            proj = v.proj.float()
            tokens = torch.stack([layer_norm_fp32(v.ln_post, t.float()) for t in tap_tokens])
            cls = x[:, 0].float()
            if cfg.cls_ln_post:
                cls = layer_norm_fp32(v.ln_post, cls)
            return cls @ proj, tokens @ proj

    # -- the method --------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """``(B, 3, S, S)`` CLIP-normalised images -> :class:`MethodOutput`: image scores ``(B,)``, maps
        ``(B, S, S)`` (sum over taps, before smoothing), terms ``tap_probs`` ``(N, B, 2, h, w)`` (normal,
        abnormal softmax per token) and ``image_logits`` ``(B, 2)`` (cos / temperature) for the loss."""
        cls, tokens = self.encode_image(images)
        text = self.text_features()  # (2, D_text)
        with torch.autocast(images.device.type, enabled=False):
            scale = 1.0 / self.config.temperature
            image_logits = F.normalize(cls, dim=-1) @ text.T * scale  # (B, 2)
            scores = image_logits.softmax(-1)[:, 1]
            patch_logits = F.normalize(tokens, dim=-1) @ text.T * scale  # (N, B, 1 + h*w, 2)
            probs = patch_logits.softmax(-1)[:, :, 1:]  # drop the class token
            n, b, hw, _ = probs.shape
            side = int(round(hw**0.5))
            tap_probs = probs.permute(0, 1, 3, 2).reshape(n, b, 2, side, side)
            grid_map = ((tap_probs[:, :, 1] + 1 - tap_probs[:, :, 0]) / 2).sum(0)  # (B, h, w)
            size = images.shape[-1]
            maps = _upsample(grid_map, (size, size))  # linear: the sum of the upsampled taps
        return MethodOutput(
            image_scores=scores,
            maps=maps,
            terms={"tap_probs": tap_probs, "image_logits": image_logits},
        )

    def loss(
        self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """train.py's loss: ``lam * (focal + dice) + image`` with, over the taps, ``focal`` the sum of
        :func:`focal_loss_reference` and ``dice`` the sum of both classes' :func:`dice_loss_reference`, on
        the tap probabilities upsampled to the mask size; ``image`` the cross-entropy of the image logits.

        masks ``(B, S, S)`` in {0, 1}, labels ``(B,)`` in {0, 1}. Returns ``(total, parts)``, the parts
        detached: ``focal``, ``dice``, ``image``, ``total``.
        """
        tap_probs = output.terms["tap_probs"]  # (N, B, 2, h, w)
        n, b, c, h, w = tap_probs.shape
        gt = masks.float()
        size = tuple(gt.shape[-2:])
        focal = tap_probs.new_zeros((), dtype=torch.float32)
        dice = tap_probs.new_zeros((), dtype=torch.float32)
        for t in range(n):
            up = _upsample(tap_probs[t].reshape(b * c, h, w), size).reshape(b, c, *size)
            focal = focal + focal_loss_reference(up, gt)
            dice = dice + dice_loss_reference(up[:, 1], gt) + dice_loss_reference(up[:, 0], 1 - gt)
        image = F.cross_entropy(output.terms["image_logits"].float(), labels.long())
        total = self.config.lam * (focal + dice) + image
        parts = {
            "focal": focal.detach(),
            "dice": dice.detach(),
            "image": image.detach(),
            "total": total.detach(),
        }
        return total, parts

    # -- bookkeeping -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> AnomalyClip:
        super().train(mode)
        self.clip.eval()  # frozen backbone: never in training mode
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The learnable prompts (what a checkpoint holds): ``ctx_pos``, ``ctx_neg``,
        ``compound_prompts_text.<i>``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state_dict`, or the reference's ``checkpoint["prompt_learner"]`` (its
        unused ``compound_prompt_projections`` and its token buffers are ignored)."""
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ConfigError(f"the prompt state lacks {missing}")
        with torch.no_grad():
            for k, v in own.items():
                if tuple(state[k].shape) != tuple(v.shape):
                    raise ConfigError(f"{k}: shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
                v.copy_(state[k])
