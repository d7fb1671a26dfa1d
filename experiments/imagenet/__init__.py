"""``python -m experiments.imagenet``: a Flax NNX ResNet trained with lepton_jax's transforms."""
