from lepton_jax.transforms._adaptive_jit import adaptive_jit as adaptive_jit
