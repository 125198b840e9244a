"""The shapes test bed: a small video model on synthetic clips, to compare long-video methods offline.

* :mod:`freeloc.shapes.clips`: seeded clips of bouncing coloured shapes (:class:`~freeloc.shapes.clips.ClipSpec`,
  :func:`~freeloc.shapes.clips.random_spec`, :func:`~freeloc.shapes.clips.render`, the model's condition);
* :mod:`freeloc.shapes.metrics`: pixel-only scores of a video against its clip (palette fidelity, shape
  and colour consistency, motion error, ...);
* :mod:`freeloc.shapes.model`: the small Wan transformer (config, build, patchifier, sampling) and the
  checkpoint shipped in ``freeloc/shapes/data/``;
* :mod:`freeloc.shapes.train`: seeded, resumable training and the export of a run
  (``python -m freeloc.shapes.train``).

The clips and metrics need only PyTorch; the model needs the ``shapes`` extra
(``pip install "freeloc[shapes]"``: diffusers, safetensors, and matplotlib for the exported loss curve).
The core of freeloc never imports this package.
"""
