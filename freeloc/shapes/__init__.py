"""The shapes test bed: a small video model on synthetic clips, to compare long-video methods offline.

* ``freeloc.shapes.clips``: seeded clips of bouncing coloured shapes (``ClipSpec``,
  ``random_spec``, ``render``, the model's condition);
* ``freeloc.shapes.metrics``: pixel-only scores of a video against its clip (palette fidelity, shape
  and colour consistency, motion error, ...);
* ``freeloc.shapes.model``: the small Wan transformer (config, build, patchifier, sampling) and the
  checkpoint shipped in ``freeloc/shapes/data/``;
* ``freeloc.shapes.train``: seeded, resumable training and the export of a run
  (``python -m freeloc.shapes.train``).

The clips and metrics need only PyTorch; the model needs the ``shapes`` extra
(``pip install "freeloc[shapes]"``: diffusers, safetensors, and matplotlib for the exported loss curve).
The core of freeloc never imports this package.
"""
