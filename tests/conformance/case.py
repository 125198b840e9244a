"""What an adapter provides to the conformance suite: a tiny model and a way to run it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConformanceCase:
    """A tiny, randomly initialised model of one architecture, and how to run it.

    Attributes:
        name: test id.
        make_model: builds the model (seeded, ``eval()``), on CPU, fp32.
        run: ``run(model, frames)`` runs one forward at ``frames`` temporal tokens with fixed seeded
            inputs (latents, text embeddings, timestep) under ``torch.no_grad()`` and returns the output.
        trained_video_frames: passed as ``trained_frames=`` (video frames) to ``freeloc.enable``.
        trained_latent: the same length in temporal tokens.
        text_tokens: text tokens in each self-attention sequence (0: video only).
        position_methods: whether the model has RoPE (position methods apply).
    """

    name: str
    make_model: Callable[[], torch.nn.Module]
    run: Callable[[torch.nn.Module, int], torch.Tensor]
    trained_video_frames: int
    trained_latent: int
    text_tokens: int = 0
    position_methods: bool = True

    @property
    def long_frames(self) -> int:
        return 4 * self.trained_latent
