"""Evaluation: run models on a dataset, score them (with `loraforge.metrics`), and write comparison reports."""
