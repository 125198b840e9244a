"""freeloc: training-free long video generation for video diffusion transformers (FreeLOC).

The core is framework-independent (torch only):

* temporal positions: :class:`VRPR` and the baselines :class:`PI`, :class:`NTK`, :class:`YaRN`,
  :class:`RIFLEx`, on a model's :class:`RotaryLayout`;
* attention patterns: :class:`TSA`, :class:`SlidingWindow`;
* :func:`freeloc.attention.attend`: band-split attention merged exactly by log-sum-exp, on the
  ``reference``, ``chunked`` or ``flex`` backend;
* :class:`LayerPlan`: which layer gets which method, as versioned JSON.
"""

from __future__ import annotations

from . import attention
from .attention import AttentionOptions, attend
from .bands import Band, BandSet
from .methods import METHODS, Method, method_from_dict
from .patterns import TSA, SlidingWindow
from .plan import LayerPlan
from .positions import NTK, PI, VRPR, RIFLEx, YaRN
from .probing import probe
from .rotary import RotaryLayout
from .session import Session, apply, enable

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attend",
    "AttentionOptions",
    "Band",
    "BandSet",
    "LayerPlan",
    "METHODS",
    "Method",
    "method_from_dict",
    "NTK",
    "PI",
    "RIFLEx",
    "RotaryLayout",
    "Session",
    "apply",
    "enable",
    "probe",
    "SlidingWindow",
    "TSA",
    "VRPR",
    "YaRN",
]
