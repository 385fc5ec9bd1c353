"""rectiflow: rectified flow (Liu, Gong, Liu, ICLR 2023) as a resumable, exactly-once pipeline on Ray.

``validate``, ``plan``, ``run`` and ``warnings`` are :mod:`workflows.api`; the method itself, in
plain PyTorch, is the :mod:`rf` package.
"""

from workflows.api import plan, run, validate, warnings
from workflows.cli import version

__version__ = version()
__all__ = ["__version__", "plan", "run", "validate", "warnings"]
