"""Solver names, checked without torch: ``euler@N``, ``heun@N``, ``rk45@TOL``, ``sde@N[:SCALE]``.

:class:`rf.solvers.Solver` is a :class:`SolverSpec` that can also integrate; the config layer only
needs the spec (``SolverSpec.parse(text).name`` is the canonical spelling).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

SolverKind = Literal["euler", "heun", "rk45", "sde"]
_SPEC = re.compile(r"^(euler|heun|rk45|sde)@([0-9.eE+-]+)(?::([0-9.eE+-]+))?$")


@dataclass(frozen=True)
class SolverSpec:
    """A solver and its settings, named ``euler@N``, ``heun@N``, ``rk45@TOL`` or ``sde@N[:SCALE]``.

    For RK45, ``TOL`` sets both rtol and atol (the paper uses 1e-5). ``sde@N:SCALE`` is N
    Euler–Maruyama steps of the marginal-preserving SDE of :mod:`rf.sde` with noise factor
    σ = SCALE (default 1; ``sde@N`` on the VP path is the VP SDE sampler)."""

    kind: SolverKind
    steps: int = 0
    tolerance: float = 1e-5
    scale: float = 1.0
    _name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("euler", "heun", "rk45", "sde"):
            raise ValueError(f"unknown solver {self.kind!r}; choose euler, heun, rk45 or sde")
        if self.kind != "rk45" and self.steps < 1:
            raise ValueError(f"{self.kind} needs steps >= 1, got {self.steps}")
        if self.kind == "rk45" and self.tolerance <= 0:
            raise ValueError(f"rk45 needs a positive tolerance, got {self.tolerance}")
        if self.kind == "sde" and not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"sde needs a finite scale >= 0, got {self.scale}")
        if self.kind != "sde" and self.scale != 1.0:
            raise ValueError(f"a noise scale only applies to sde, not {self.kind}")
        detail = f"{self.tolerance:g}" if self.kind == "rk45" else str(self.steps)
        if self.kind == "sde" and self.scale != 1.0:
            short = f"{self.scale:g}"
            detail += ":" + (short if float(short) == self.scale else repr(float(self.scale)))
        object.__setattr__(self, "_name", f"{self.kind}@{detail}")

    @property
    def name(self) -> str:
        return self._name

    @classmethod
    def parse(cls, text: str) -> SolverSpec:
        """``euler@100`` → SolverSpec("euler", steps=100); ``rk45@1e-5`` → SolverSpec("rk45", tolerance=1e-5);
        ``sde@2000:0.5`` → SolverSpec("sde", steps=2000, scale=0.5)."""
        match = _SPEC.match(text.strip())
        if not match:
            raise ValueError(
                f"solver {text!r} is not of the form euler@N, heun@N, rk45@TOL or sde@N[:SCALE] "
                "(e.g. rk45@1e-5, sde@2000:0.5)"
            )
        kind, value, scale = match.groups()
        try:
            if scale is not None and kind != "sde":
                raise ValueError(f"only sde takes a :SCALE, not {kind}")
            if kind == "rk45":
                return cls("rk45", tolerance=float(value))
            if kind == "sde":
                return cls("sde", steps=int(value), scale=1.0 if scale is None else float(scale))
            return cls(kind, steps=int(value))  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"solver {text!r}: {error}") from None
