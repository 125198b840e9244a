"""What several test modules share: attention inputs, methods and tolerances (importable at collection
time, for parametrization; the fixtures that wrap them are in ``conftest.py``), and a tiny Wan pipeline
saved to a folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import freeloc
from freeloc.methods import Method

#: Largest |backend - reference| accepted, per dtype (the merges run in float32).
TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}
#: (frames, height, width): tokens per frame 15 and 21, neither a multiple of 8 nor of 128.
GRIDS = [(30, 3, 5), (17, 7, 3)]
VRPR_81 = freeloc.VRPR.for_length(81, 21)
HEAD_DIM = 24
ROTARY = freeloc.RotaryLayout.wan(HEAD_DIM)
#: A TSA with every tier present at the small test grids.
SMALL_TSA = freeloc.TSA(d1=3, d2=9, stripe=0.25, sink_group=4, sink_window=6, cap=12)


def methods() -> list[tuple[str, Method | None]]:
    """(id, method) of every kind of method, at settings that change attention at 30 frames."""
    return [
        ("none", None),
        ("vrpr", freeloc.VRPR.for_length(30, 13)),
        ("vrpr-small", freeloc.VRPR(3, 5, 2, 4, 12)),
        ("tsa", SMALL_TSA),
        ("tsa-default", freeloc.TSA(cap=12)),
        ("sliding", freeloc.SlidingWindow(4)),
        ("sliding-nosink", freeloc.SlidingWindow(2, sink=False)),
        ("pi", freeloc.PI(2.0)),
        ("ntk", freeloc.NTK(2.0)),
        ("riflex", freeloc.RIFLEx(k=2, num_frames=30)),
        ("tsa+vrpr", freeloc.TSAVRPR(SMALL_TSA, freeloc.VRPR(3, 5, 2, 4, 12))),
        ("window+vrpr", freeloc.WindowVRPR(freeloc.SlidingWindow(4), freeloc.VRPR(3, 5, 2, 4, 12))),
    ]


def qkv(n: int, dtype: torch.dtype, seed: int, batch: int = 2, heads: int = 3,
        head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random q, k, v of shape (batch, n, heads, head_dim) in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=g).to(dtype) for _ in range(3))
    return q, k, v


def rotate_original(x: torch.Tensor, grid: tuple[int, int, int], t_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Video tokens ``x`` (frame-major) rotated at their original (t, h, w) positions."""
    f, h, w = grid
    t = torch.arange(f, dtype=torch.float64).repeat_interleave(h * w)
    hp = torch.arange(h, dtype=torch.float64).repeat_interleave(w).repeat(f)
    wp = torch.arange(w, dtype=torch.float64).repeat(f * h)
    return ROTARY.rotate(x, t, hp, wp, t_freqs)


def tiny_wan_and_run() -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """A tiny random 2-layer diffusers Wan transformer, and a call of it on fixed inputs of 12 latent frames
    (no grad)."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=128).eval()
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(1, 16, 12, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(x, torch.tensor([500]), enc, return_dict=False)[0]

    return model, run


def saved_tiny_wan(folder: Path) -> Path:
    """The tiny Wan pipeline with a tiny random UMT5 text encoder and a word-level tokenizer built in memory
    (no hub), saved with ``save_pretrained``: a folder as a real checkpoint is laid out."""
    import diffusers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from freeloc.app.video import tiny_wan_pipeline

    words = ["<pad>", "</s>", "<unk>", "a", "red", "ball"]
    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8)).eval()
    tiny = tiny_wan_pipeline()
    diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny.vae, transformer=tiny.transformer,
                          scheduler=tiny.scheduler).save_pretrained(folder)
    return folder
