"""freeloc: training-free long video generation for video diffusion transformers (FreeLOC).

What users call:

* ``enable``: apply a layer plan (or one method on every layer) to a pipeline or transformer;
  it returns a ``Session`` that takes everything off again;
* ``probe``: measure which layers suffer from positions and which from context, and write the
  ``LayerPlan``; ``probe_loss``: choose each layer's method per length by the model's own loss on real
  clips;
* the methods: ``VRPR`` and ``TSA`` (FreeLOC's two corrections), their compositions ``TSAVRPR`` and
  ``WindowVRPR`` (a bounded context at re-encoded positions), and the baselines ``SlidingWindow``,
  ``PI``, ``NTK``, ``YaRN``, ``RIFLEx``, ``UltraViCo``;
* ``attend`` with its ``AttentionOptions``: band-split attention merged exactly by
  log-sum-exp, on a model's ``RotaryLayout``, for code that calls attention itself;
* ``register_adapter``: add an adapter for a new model (or declare it under the entry-point group
  ``freeloc.adapters``).

The core needs only PyTorch (and einops, jaxtyping, beartype); adapters for diffusers and Open-Sora
models live in ``freeloc.adapters``, the command line and plots in ``freeloc.app``, the shapes test
bed in ``freeloc.shapes``.
"""

from __future__ import annotations

from .attention import AttentionOptions, attend
from .composed import TSAVRPR, WindowVRPR
from .logit_decay import UltraViCo
from .loss_probe import probe_loss
from .patterns import TSA, SlidingWindow
from .plan import LayerPlan
from .positions import NTK, PI, VRPR, RIFLEx, YaRN
from .probing import probe
from .registry import register_adapter
from .rotary import RotaryLayout
from .session import Session, enable

__version__ = "0.1.0"

__all__ = [
    "AttentionOptions",
    "LayerPlan",
    "NTK",
    "PI",
    "RIFLEx",
    "RotaryLayout",
    "Session",
    "SlidingWindow",
    "TSA",
    "TSAVRPR",
    "UltraViCo",
    "VRPR",
    "WindowVRPR",
    "YaRN",
    "attend",
    "enable",
    "probe",
    "probe_loss",
    "register_adapter",
]
