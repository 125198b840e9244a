"""Synthetic clips of bouncing shapes: the test bed's data.

A clip is described by a ``ClipSpec``: one to three coloured squares or discs, each moving at a
constant velocity and bouncing off the frame borders. ``random_spec`` draws one from a seed,
``render`` draws it exactly (hard edges, colours taken verbatim from ``PALETTE`` over
``BACKGROUND``), ``trajectory`` gives the true centres, and ``condition`` gives a fixed-size
vector a model can receive in place of a text embedding. ``freeloc.shapes.metrics`` scores a video
against its spec from the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "BACKGROUND",
    "CONDITION_DIM",
    "MAX_SHAPES",
    "MAX_SPEED",
    "PALETTE",
    "SLOT_DIM",
    "ClipSpec",
    "condition",
    "random_spec",
    "render",
    "trajectory",
]

#: Six clearly distinct RGB colours in [0, 1] (pairwise L-inf distance >= 0.7).
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.9, 0.1, 0.1),  # red
    (0.1, 0.85, 0.1),  # green
    (0.1, 0.2, 0.95),  # blue
    (0.95, 0.9, 0.1),  # yellow
    (0.9, 0.1, 0.9),  # magenta
    (0.1, 0.9, 0.9),  # cyan
)
#: Background colour (dark grey).
BACKGROUND: tuple[float, float, float] = (0.2, 0.2, 0.2)
#: Maximum number of shapes in a clip (and number of slots in ``condition``).
MAX_SHAPES = 3
#: Width of one shape slot in ``condition``: present, 6-way colour one-hot, is_disc, vy, vx, y, x.
SLOT_DIM = 1 + len(PALETTE) + 1 + 2 + 2
#: Length of the ``condition`` vector: ``MAX_SHAPES`` slots plus one global entry.
CONDITION_DIM = MAX_SHAPES * SLOT_DIM + 1
#: Maximum speed |v| in pixels per frame.
MAX_SPEED = 3.0
_KINDS = ("square", "disc")
#: random_spec: consecutive rejected start positions before the placement starts over, and how often.
_MAX_MISSES = 1000
_MAX_RESTARTS = 100


@dataclass(frozen=True)
class ClipSpec:
    """Description of one synthetic clip.

    Attributes:
        num_shapes: Number of shapes, 1..3.
        colors: Distinct palette indices (into ``PALETTE``), one per shape.
        shape_kinds: ``"square"`` or ``"disc"`` per shape.
        velocities: ``(vy, vx)`` per shape in pixels per frame; both components nonzero, ``|v| <= 3``.
        positions: ``(y, x)`` start centre per shape, inside ``[size, frame_size - 1 - size]``.
        size: Shape half-size in pixels (a square covers ``2 * size + 1`` pixels per side; a disc has
            radius ``size``).
        frame_size: Height and width of the square frame in pixels.
    """

    num_shapes: int
    colors: tuple[int, ...]
    shape_kinds: tuple[str, ...]
    velocities: tuple[tuple[float, float], ...]
    positions: tuple[tuple[float, float], ...]
    size: int = 3
    frame_size: int = 32

    def __post_init__(self) -> None:
        """Validate the spec.

        Raises:
            ValueError: If any field is out of range or the per-shape tuples disagree in length.
        """
        n = self.num_shapes
        if not 1 <= n <= MAX_SHAPES:
            raise ValueError(f"num_shapes must be in 1..{MAX_SHAPES}, got {n}")
        for name in ("colors", "shape_kinds", "velocities", "positions"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one entry per shape ({n})")
        if len(set(self.colors)) != n or not all(0 <= c < len(PALETTE) for c in self.colors):
            raise ValueError(f"colors must be distinct palette indices, got {self.colors}")
        if not all(k in _KINDS for k in self.shape_kinds):
            raise ValueError(f"shape_kinds must be in {_KINDS}, got {self.shape_kinds}")
        if self.size < 1 or self.frame_size < 2 * self.size + 3:
            raise ValueError("need size >= 1 and frame_size >= 2 * size + 3")
        lo, hi = self.size, self.frame_size - 1 - self.size
        for (vy, vx), (y, x) in zip(self.velocities, self.positions, strict=True):
            if vy == 0 or vx == 0 or math.hypot(vy, vx) > MAX_SPEED + 1e-9:
                raise ValueError(f"velocity components must be nonzero with |v| <= {MAX_SPEED}, got {(vy, vx)}")
            if not (lo <= y <= hi and lo <= x <= hi):
                raise ValueError(f"position {(y, x)} outside [{lo}, {hi}]")

    @property
    def speeds(self) -> tuple[float, ...]:
        """Speed ``|v|`` of each shape in pixels per frame."""
        return tuple(float(math.hypot(vy, vx)) for vy, vx in self.velocities)


def random_spec(generator: torch.Generator | int, frame_size: int = 32, size: int = 3) -> ClipSpec:
    """Draw a random clip spec.

    Shapes get distinct colours, integer start centres that do not overlap, and integer velocity
    components in ``{-2, -1, 1, 2}`` (so centres stay on the pixel grid and rendering is exact).

    Args:
        generator: A torch generator or an integer seed.
        frame_size: Frame height and width in pixels.
        size: Shape half-size in pixels.

    Returns:
        The spec.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)

    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator).item())

    n = 1 + draw(MAX_SHAPES)
    colors = tuple(int(c) for c in torch.randperm(len(PALETTE), generator=generator)[:n].tolist())
    kinds = tuple(_KINDS[draw(2)] for _ in range(n))
    steps = (-2.0, -1.0, 1.0, 2.0)
    velocities = tuple((steps[draw(4)], steps[draw(4)]) for _ in range(n))
    lo, span = size, frame_size - 2 * size
    positions: list[tuple[float, float]] = []
    misses = restarts = 0
    while len(positions) < n:
        y, x = float(lo + draw(span)), float(lo + draw(span))
        if all(max(abs(y - py), abs(x - px)) > 2 * size + 1 for py, px in positions):
            positions.append((y, x))
            misses = 0
        elif (misses := misses + 1) >= _MAX_MISSES:  # the shapes placed so far leave no room: start over
            positions, misses, restarts = [], 0, restarts + 1
            if restarts > _MAX_RESTARTS:
                raise ValueError(f"cannot place {n} non-overlapping shapes of half-size {size} in a "
                                 f"{frame_size} x {frame_size} frame")
    return ClipSpec(n, colors, kinds, velocities, tuple(positions), size=size, frame_size=frame_size)


def trajectory(spec: ClipSpec, num_frames: int) -> Float[Tensor, "frames shapes 2"]:
    """True shape centres per frame, with reflection off the borders.

    Each coordinate moves as ``p0 + v * t`` folded into ``[size, frame_size - 1 - size]`` by a
    triangle wave, which is exactly reflecting position and velocity whenever a shape's extent would
    leave the frame.

    Args:
        spec: The clip spec.
        num_frames: Number of frames ``T >= 1``.

    Returns:
        ``(T, num_shapes, 2)`` float32 centres ``(y, x)``.
    """
    t = torch.arange(num_frames, dtype=torch.float64)[:, None, None]
    p0 = torch.tensor(spec.positions, dtype=torch.float64)[None]
    v = torch.tensor(spec.velocities, dtype=torch.float64)[None]
    lo = float(spec.size)
    length = float(spec.frame_size - 1 - 2 * spec.size)
    u = torch.remainder(p0 + v * t - lo, 2 * length)
    return (lo + torch.where(u <= length, u, 2 * length - u)).float()


def _shape_masks(spec: ClipSpec, centers: Tensor) -> Tensor:
    """Boolean ``(T, n, H, W)`` pixel masks of each shape at the given ``(T, n, 2)`` centres."""
    grid = torch.arange(spec.frame_size, dtype=torch.float32)
    dy = grid[None, None, :, None] - centers[..., 0, None, None]
    dx = grid[None, None, None, :] - centers[..., 1, None, None]
    square = (dy.abs() <= spec.size) & (dx.abs() <= spec.size)
    disc = dy**2 + dx**2 <= spec.size**2 + 0.5
    is_disc = torch.tensor([k == "disc" for k in spec.shape_kinds])[None, :, None, None]
    return torch.where(is_disc, disc, square)


def render(spec: ClipSpec, num_frames: int) -> Float[Tensor, "frames 3 height width"]:
    """Render a clip: shapes drawn in order (later on top) over the background.

    Args:
        spec: The clip spec.
        num_frames: Number of frames ``T >= 1`` (any length).

    Returns:
        ``(T, 3, H, W)`` float32 video in [0, 1]; every pixel is exactly the background or a palette colour.
    """
    masks = _shape_masks(spec, trajectory(spec, num_frames))
    video = torch.tensor(BACKGROUND).view(1, 3, 1, 1).expand(num_frames, 3, spec.frame_size, spec.frame_size)
    video = video.clone()
    for i, c in enumerate(spec.colors):
        video = torch.where(masks[:, i, None], torch.tensor(PALETTE[c]).view(1, 3, 1, 1), video)
    return video


def condition(spec: ClipSpec) -> Float[Tensor, " cond"]:
    """Fixed-size conditioning vector used in place of a text embedding.

    Layout (length ``CONDITION_DIM`` = 37): three slots of ``SLOT_DIM`` = 12 numbers, slot ``i``
    describing shape ``i`` (all zeros when ``i >= num_shapes``)::

        [present (1), colour one-hot (6), is_disc (1), vy / 3, vx / 3, y / frame_size, x / frame_size]

    followed by one global entry ``num_shapes / 3``.

    Args:
        spec: The clip spec.

    Returns:
        ``(CONDITION_DIM,)`` float32 vector with entries in [-1, 1].
    """
    out = torch.zeros(CONDITION_DIM)
    for i in range(spec.num_shapes):
        slot = out[i * SLOT_DIM : (i + 1) * SLOT_DIM]
        slot[0] = 1.0
        slot[1 + spec.colors[i]] = 1.0
        slot[7] = float(spec.shape_kinds[i] == "disc")
        slot[8:10] = torch.tensor(spec.velocities[i]) / MAX_SPEED
        slot[10:12] = torch.tensor(spec.positions[i]) / spec.frame_size
    out[-1] = spec.num_shapes / MAX_SHAPES
    return out
