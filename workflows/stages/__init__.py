"""The stages of a pipeline: each a plain function of its config and its inputs' locations."""
