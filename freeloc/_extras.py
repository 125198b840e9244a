"""Optional dependencies: import one where it is needed, or say which extra of freeloc installs it.

The core needs only PyTorch and a few small packages. The command line, the plots, the video writing and
the shapes test bed need more (matplotlib, tqdm, imageio, Pillow, diffusers, safetensors); each imports
them inside the function that uses them, through ``require``, so that a missing package is one
clear error that names the extra to install.

Examples:
    >>> require("math", "app", "an example").sqrt(4.0)
    2.0
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "require"]

#: The extras of ``pyproject.toml`` an error may name.
EXTRAS = ("app", "shapes", "diffusers")

#: Import names whose pip distribution is spelled differently.
_DISTRIBUTIONS = {"PIL": "pillow", "imageio_ffmpeg": "imageio-ffmpeg"}


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise an ``ImportError`` that names the extra to install.

    Args:
        module: the dotted module name, e.g. ``"matplotlib"`` or ``"safetensors.torch"``.
        extra: the extra of freeloc that installs it, one of ``EXTRAS``.
        purpose: what needs it, the start of the message, e.g. ``"freeloc explain --png"``.

    Returns:
        The imported module.

    Raises:
        ValueError: If ``extra`` is not one of ``EXTRAS``.
        ImportError: If the module cannot be imported, e.g. ``freeloc explain --png needs matplotlib:
            pip install "freeloc[app]"``; the original error is its cause.
    """
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {list(EXTRAS)}, got {extra!r}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.partition(".")[0]
        package = _DISTRIBUTIONS.get(top, top)
        needs = top if package == top else f"{top} (package {package})"
        raise ImportError(f'{purpose} needs {needs}: pip install "freeloc[{extra}]"', name=top) from err
