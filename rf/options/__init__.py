"""Torch-free descriptions of rf's configurable parts: names, options and their checks.

The workflow's config layer validates a pipeline file against these without importing torch
(``rectiflow validate`` starts in a fraction of a second); the torch classes of :mod:`rf` are built
from the same descriptions, so an option is checked in exactly one place.

- :mod:`rf.options.models` — velocity networks (``mlp``, ``unet``) and the shape they take;
- :mod:`rf.options.solvers` — solver names ``euler@N``, ``heun@N``, ``rk45@TOL``, ``sde@N[:σ]``;
- :mod:`rf.options.timesteps` — training-time samplers;
- :mod:`rf.options.losses` — training losses;
- :mod:`rf.options.toy` — 2D toy distributions.
"""
