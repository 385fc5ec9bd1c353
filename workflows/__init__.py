"""rectiflow's Ray layer: stages, the pipeline, storage, config, CLI and report."""

__version__ = "0.1.0"
"""rectiflow's version, the one place it is written (pyproject.toml reads it from here), so code
shipped with a job without being installed still knows it."""
