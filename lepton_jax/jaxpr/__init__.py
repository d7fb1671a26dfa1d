"""The shared jaxpr analysis layer: tracing, walking, cost, liveness, matching, rewriting.

>>> import jax.numpy as jnp
>>> from lepton_jax import jaxpr as ljx
>>> ljx.cost(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 2))).flops
128
"""

from lepton_jax.jaxpr._trace import Traced as Traced
from lepton_jax.jaxpr._trace import trace as trace
from lepton_jax.jaxpr._trace import validate_args as validate_args
from lepton_jax.jaxpr._walk import EqnRef as EqnRef
from lepton_jax.jaxpr._walk import SubJaxpr as SubJaxpr
from lepton_jax.jaxpr._walk import aval_bytes as aval_bytes
from lepton_jax.jaxpr._walk import sub_jaxprs as sub_jaxprs
from lepton_jax.jaxpr._walk import walk as walk
from lepton_jax.jaxpr._walk import while_trip_count as while_trip_count
from lepton_jax.jaxpr._cost import Cost as Cost
from lepton_jax.jaxpr._cost import cost as cost
from lepton_jax.jaxpr._cost import eqn_cost as eqn_cost
from lepton_jax.jaxpr._cost import eqn_local_cost as eqn_local_cost
from lepton_jax.jaxpr._cost import jaxpr_cost as jaxpr_cost
from lepton_jax.jaxpr._liveness import Liveness as Liveness
from lepton_jax.jaxpr._liveness import Residual as Residual
from lepton_jax.jaxpr._liveness import grad_jaxpr as grad_jaxpr
from lepton_jax.jaxpr._liveness import grad_peak_bytes as grad_peak_bytes
from lepton_jax.jaxpr._liveness import liveness as liveness
from lepton_jax.jaxpr._liveness import peak_live_bytes as peak_live_bytes
from lepton_jax.jaxpr._liveness import saved_residual_bytes as saved_residual_bytes
from lepton_jax.jaxpr._liveness import saved_residuals as saved_residuals
from lepton_jax.jaxpr._match import Capture as Capture
from lepton_jax.jaxpr._match import Match as Match
from lepton_jax.jaxpr._match import Pattern as Pattern
from lepton_jax.jaxpr._match import Rule as Rule
from lepton_jax.jaxpr._match import find_matches as find_matches
from lepton_jax.jaxpr._rewrite import eval_jaxpr_with_rewrites as eval_jaxpr_with_rewrites
from lepton_jax.jaxpr._rewrite import rewrite as rewrite
from lepton_jax.jaxpr._rewrite import select_matches as select_matches
from lepton_jax.jaxpr._summary import EqnSummary as EqnSummary
from lepton_jax.jaxpr._summary import Summary as Summary
from lepton_jax.jaxpr._summary import summarize as summarize
from lepton_jax.jaxpr._liveness import GradMemory as GradMemory
from lepton_jax.jaxpr._liveness import grad_memory as grad_memory
from lepton_jax.jaxpr._rewrite import rewrite_jaxpr as rewrite_jaxpr
from lepton_jax.jaxpr._registry import PrimitiveInfo as PrimitiveInfo
from lepton_jax.jaxpr._registry import primitive_info as primitive_info
from lepton_jax.jaxpr._defuse import DefUse as DefUse
from lepton_jax.jaxpr._driver import Rewrite as Rewrite
from lepton_jax.jaxpr._driver import rewrite_nested as rewrite_nested
from lepton_jax.jaxpr._eval import eval_jaxpr as eval_jaxpr
from lepton_jax.jaxpr._compiled import CompiledFigures as CompiledFigures
from lepton_jax.jaxpr._compiled import compiled_figures as compiled_figures
