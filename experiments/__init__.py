"""Runnable experiments built on lepton_jax (``python -m experiments.imagenet``)."""
