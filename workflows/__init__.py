"""rectiflow's Ray layer: stages, the pipeline, storage, config, CLI and report."""
