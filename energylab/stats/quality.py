"""Small conversions: PSNR and decibels."""

from __future__ import annotations

import math

__all__ = ["psnr", "to_db"]


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(peak^2 / mse)``; ``inf`` for ``mse == 0``.

    ``peak`` is the largest signal value (1 for images in ``[0, 1]``, 255 for 8-bit values).

    Raises:
        ValueError: ``mse < 0`` or ``peak <= 0``.

    >>> round(psnr(0.001), 4)
    30.0
    """
    if mse < 0 or peak <= 0:
        raise ValueError(f"psnr needs mse >= 0 and peak > 0, got mse={mse}, peak={peak}")
    return math.inf if mse == 0 else to_db(peak**2 / mse)


def to_db(ratio: float) -> float:
    """``10 log10(ratio)``, a gain ratio in decibels. Raises ValueError for ``ratio <= 0``.

    >>> to_db(100.0)
    20.0
    """
    if ratio <= 0:
        raise ValueError(f"a ratio in dB must be positive, got {ratio}")
    return 10.0 * math.log10(ratio)
