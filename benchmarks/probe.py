"""Probe cost: ``freeloc.probe`` wall time against one plain forward of the same model and shape.

    python benchmarks/probe.py [--layers 8] [--frames 24] [--size 16]

A small random Wan transformer (``--layers`` blocks, 2 heads x 48) on CPU, probed at ``--frames``
latent frames (4x its declared trained 6) on a ``--size`` x ``--size`` latent. Prints the probe's
time, one forward's time (median of 5, measured in the same run), their ratio, and the number of
forwards the probe ran (2 shared runs + per layer one per key shift + one windowed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from freeloc.probing import probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=16)
    args = ap.parse_args()
    import diffusers

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=48, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=args.layers, rope_max_seq_len=256,
    ).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, args.frames, args.size, args.size, generator=g),
                  timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
                  return_dict=False)
    tokens = args.frames * (args.size // 2) ** 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Wan {args.layers} layers, "
          f"{args.frames} latent frames x {(args.size // 2) ** 2} tokens = {tokens} tokens")
    with torch.no_grad():
        model(**inputs)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - t0)
    forward = statistics.median(times)
    t0 = time.perf_counter()
    plan = probe(model, 4 * (args.frames - 1) + 1, inputs=inputs, trained_frames=21)
    seconds = time.perf_counter() - t0
    forwards = plan.meta["cost"]["forwards"]
    print(f"one forward: {forward:.3f} s")
    print(f"probe:       {seconds:.3f} s = {seconds / forward:.1f} x one forward; {forwards} forwards "
          f"({seconds / forward / forwards:.2f} forward-equivalents per forward, the rest is logits/entropy)")
    print(f"plan: {plan.summary()}")


if __name__ == "__main__":
    main()
