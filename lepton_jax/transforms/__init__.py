from lepton_jax.transforms._remat_plan import remat_plan as remat_plan, RematPlan as RematPlan
from lepton_jax.transforms._adaptive_jit import adaptive_jit as adaptive_jit
