"""The options of the velocity networks, checked without torch.

:class:`rf.models.MLPVelocity` and :class:`rf.models.UNet` take exactly these keyword options and
keep the checked :class:`MLPOptions` / :class:`UNetOptions`; ``build_model(kind, config)``
rebuilds a network from ``{"kind", "config"}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from rf.registry import construct

RESBLOCK_TYPES = ("biggan", "ddpm")


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _ints(name: str, values: Iterable[Any]) -> tuple[int, ...]:
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError(f"{name} must contain only ints, got {values!r}")
    return items


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


@dataclass(frozen=True)
class MLPOptions:
    """v(x, t) for x in R^dim: ``depth`` hidden layers of ``width``, t embedded by
    ``time_embed_dim`` sinusoids (see :mod:`rf.models.mlp`)."""

    dim: int = 2
    width: int = 256
    depth: int = 3
    time_embed_dim: int = 16

    def __post_init__(self) -> None:
        for name in ("dim", "width", "depth"):
            _int_at_least(name, getattr(self, name), 1)
        if _int_at_least("time_embed_dim", self.time_embed_dim, 2) % 2:
            raise ValueError(f"time_embed_dim must be an even number >= 2, got {self.time_embed_dim}")

    @property
    def input_shape(self) -> list[int]:
        return [self.dim]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UNetOptions:
    """The DDPM++ UNet of :mod:`rf.models.unet` (see :class:`rf.models.UNet` for each option).

    ``resolution`` must be divisible by ``2 ** (len(channel_mult) − 1)`` and every entry of
    ``attn_resolutions`` must be a resolution the network reaches."""

    in_channels: int = 3
    resolution: int = 32
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    time_embed_scale: float = 999.0
    num_groups: int = 32
    skip_rescale: bool = True
    resample_with_conv: bool = True
    resblock_type: str = "biggan"

    def __post_init__(self) -> None:
        for name, minimum in (
            ("in_channels", 1),
            ("resolution", 1),
            ("base_channels", 2),
            ("num_res_blocks", 1),
            ("num_groups", 1),
        ):
            _int_at_least(name, getattr(self, name), minimum)
        channel_mult = _ints("channel_mult", self.channel_mult)
        attn_resolutions = _ints("attn_resolutions", self.attn_resolutions)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of ints >= 1, got {channel_mult!r}")
        factor = 2 ** (len(channel_mult) - 1)
        if self.resolution % factor:
            raise ValueError(
                f"resolution={self.resolution} must be divisible by 2**(len(channel_mult)-1)={factor} "
                f"(channel_mult={channel_mult} implies {len(channel_mult) - 1} downsamplings)"
            )
        unreached = sorted(set(attn_resolutions) - set(self.level_resolutions(channel_mult)))
        if unreached:
            raise ValueError(
                f"attn_resolutions contains {unreached}, which the network never reaches; "
                f"reachable resolutions are {self.level_resolutions(channel_mult)}"
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        scale = self.time_embed_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"time_embed_scale must be a finite float > 0, got {scale!r}")
        _flag("skip_rescale", self.skip_rescale)
        _flag("resample_with_conv", self.resample_with_conv)
        if self.resblock_type not in RESBLOCK_TYPES:
            raise ValueError(f"resblock_type must be one of {RESBLOCK_TYPES}, got {self.resblock_type!r}")
        object.__setattr__(self, "channel_mult", channel_mult)
        object.__setattr__(self, "attn_resolutions", attn_resolutions)
        object.__setattr__(self, "dropout", float(dropout))
        object.__setattr__(self, "time_embed_scale", float(scale))

    def level_resolutions(self, channel_mult: tuple[int, ...] | None = None) -> list[int]:
        """The resolution of each level, from the input down."""
        return [self.resolution // 2**i for i in range(len(channel_mult or self.channel_mult))]

    @property
    def input_shape(self) -> list[int]:
        return [self.in_channels, self.resolution, self.resolution]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready keyword options (lists for the sequences)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


MODEL_OPTIONS: dict[str, type[MLPOptions] | type[UNetOptions]] = {"mlp": MLPOptions, "unet": UNetOptions}


def model_options(kind: str, config: dict[str, Any] | None = None) -> MLPOptions | UNetOptions:
    """The checked options of a ``kind`` network (``mlp`` or ``unet``); ValueError naming the
    problem otherwise."""
    return construct(MODEL_OPTIONS, kind, "model kind", **(config or {}))
