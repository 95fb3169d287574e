"""Text prompts for the two states (normal, abnormal) and their frozen CLIP embeddings.

``paper``: the two sentences of FE-CLIP, "A photo of a normal object" / "A photo of a damaged object".
``ensemble``: state words x templates (the WinCLIP / APRIL-GAN style ensemble, object-agnostic: the
object word is "object"); each state's sentence embeddings are L2-normalised, averaged and normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROMPT_MODES = ("paper", "ensemble")
PAPER_PROMPTS = ("A photo of a normal object", "A photo of a damaged object")

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a cropped photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a blurry photo of a {}.",
    "a good photo of the {}.",
    "a low resolution photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
    "this is a {} in the scene.",
    "an industrial photo of a {}.",
    "a photo of a {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
    "a black and white photo of the {}.",
)


def compose_sentences(states: Sequence[str], templates: Sequence[str], object_word: str) -> list[str]:
    """The compositional prompt ensemble of one state: every state phrasing of ``object_word`` in every
    template, state-major (``len(states) * len(templates)`` sentences, in the order the peers' reference
    code builds them; the order matters only through floating-point summation)."""
    return [t.format(s.format(object_word)) for s in states for t in templates]


def prompt_sentences(
    mode: str = "paper",
    normal: str = PAPER_PROMPTS[0],
    abnormal: str = PAPER_PROMPTS[1],
    object_word: str = "object",
) -> tuple[list[str], list[str]]:
    """The sentences of each state: ``(normal_sentences, abnormal_sentences)``."""
    if mode == "paper":
        return [normal], [abnormal]
    if mode == "ensemble":
        return (
            compose_sentences(NORMAL_STATES, TEMPLATES, object_word),
            compose_sentences(ABNORMAL_STATES, TEMPLATES, object_word),
        )
    raise ValueError(f"prompts must be one of {PROMPT_MODES}, got {mode!r}")


@torch.no_grad()
def encode_states(clip: nn.Module, normal: list[str], abnormal: list[str], tokenizer=None) -> torch.Tensor:
    """Embed the sentences of both states with the frozen text tower.

    Returns the L2-normalised state embeddings, shape ``(2, D_text)``: row 0 normal, row 1 abnormal.
    """
    if tokenizer is None:
        import open_clip

        from feclip.models.clip import _quiet_open_clip

        with _quiet_open_clip():
            tokenizer = open_clip.get_tokenizer(getattr(clip, "feclip_model_name", "ViT-L-14"))
    device = next(clip.parameters()).device
    rows = []
    for sentences in (normal, abnormal):
        tokens = tokenizer(sentences).to(device)
        emb = F.normalize(clip.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)
