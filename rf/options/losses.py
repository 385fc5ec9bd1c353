"""Names and options of the training losses of :mod:`rf.losses`, checked without torch."""

from __future__ import annotations

LOSSES = ("l2", "pseudo_huber", "lpips", "lpips_huber")
LPIPS_LOSSES = ("lpips", "lpips_huber")
_OPTIONS = {"l2": (), "pseudo_huber": ("c",), "lpips": ("resize",), "lpips_huber": ("c", "resize")}
DEFAULT_LPIPS_RESIZE = 224


def canonical_loss_name(name: str) -> str:
    """``name`` with dashes read as underscores (``lpips-huber`` → ``lpips_huber``)."""
    return name.replace("-", "_")


def check_loss(name: str, options: dict[str, float], weights: object = None) -> str:
    """The canonical name when ``name`` with ``options`` (and ``weights``) makes a loss, else
    ValueError; reads no file (the LPIPS weights are only required to be given)."""
    canonical = canonical_loss_name(name)
    if canonical not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    unknown = sorted(set(options) - set(_OPTIONS[canonical]))
    if unknown:
        allowed = ", ".join(_OPTIONS[canonical]) or "none"
        raise ValueError(f"the {canonical} loss takes no option {', '.join(unknown)} (options: {allowed})")
    if "c" in options and options["c"] <= 0:
        raise ValueError(f"pseudo-Huber c must be positive, got {options['c']}")
    if "resize" in options and (options["resize"] < 0 or options["resize"] != int(options["resize"])):
        raise ValueError(f"resize must be a whole number of pixels >= 16 (or 0 for none), got {options['resize']}")
    if "resize" in options and 0 < options["resize"] < 16:
        raise ValueError(f"resize must be at least 16 pixels (LPIPS's five VGG stages), got {options['resize']}")
    if canonical in LPIPS_LOSSES and weights is None:
        raise ValueError(
            f"the {canonical} loss needs weights: the URI of the LPIPS (VGG16) network's safetensors file "
            "(nothing is downloaded)"
        )
    if canonical not in LPIPS_LOSSES and weights is not None:
        raise ValueError(f"the {canonical} loss takes no weights (only lpips and lpips_huber do)")
    return canonical
