"""mtsgd_jax: Stochastic Multiple Target Sampling Gradient Descent (MT-SGD) in JAX.

MT-SGD moves M particles so that they sample from K unnormalised target
densities at once: per step it forms one Stein direction per target, their RKHS
Gram matrix U (K, K), solves ONE simplex QP for the weights and applies the
weighted direction to every particle. The library exposes it as an optax
transformation (:func:`mtsgd`), with SVGD (:func:`svgd`) as the K = 1 case and
the multi-objective baselines MOO-SVGD (:func:`moo_svgd`), MGDA (:func:`mgda`)
linear scalarisation (:func:`linear_scalarization`) and Pareto MTL
(:func:`pareto_mtl`) behind the same interface.
"""

from mtsgd_jax.algorithm import SamplerState, SamplingAlgorithm, StepInfo, mtsgd_sampler
from mtsgd_jax.kernels import (
    KernelMatrices,
    KernelProducts,
    RadialKernel,
    imq,
    kernel_matrices,
    kernel_products,
    median_bandwidth,
    pairwise_sq_dists,
    radial_kernel,
    rbf,
)
from mtsgd_jax.particles import (
    ParticleSpec,
    flatten_particles,
    flatten_target_grads,
    init_flax_particles,
    init_particles,
    num_particles,
    target_grad_pieces,
    unflatten_particles,
)
from mtsgd_jax.problems import ToyProblem, ZDTProblem, toy_problem, zdt
from mtsgd_jax.qp import SOLVERS, min_norm_weights, projection_simplex
from mtsgd_jax.sampling import (
    NonFiniteError,
    NonFiniteReport,
    NonFiniteWarning,
    SampleResult,
    Trace,
    find_stein_state,
    sample,
    shard_particles,
)
from mtsgd_jax.stein import (
    SteinQuantities,
    gram_matrix,
    kernel_stein_discrepancy,
    stein_directions,
    stein_quantities,
)
from mtsgd_jax.targets import (
    log_prob_value_and_loss_grads,
    loss_value_and_grads,
    stack_targets,
    value_and_grads,
)
from mtsgd_jax.transforms import (
    TRANSFORMS,
    WEIGHTINGS,
    TransformSpec,
    MGDAState,
    MOOSVGDState,
    MTSGDState,
    ParetoMTLState,
    SVGDState,
    clip_to_box,
    format_spec,
    linear_scalarization,
    make_transform,
    mgda,
    moo_svgd,
    mtsgd,
    normalize_target_grads,
    parse_spec,
    pareto_mtl,
    pareto_mtl_preferences,
    preference_vectors,
    project_box,
    svgd,
)

__version__ = "0.1.0"

__all__ = [
    "KernelMatrices",
    "KernelProducts",
    "MGDAState",
    "MOOSVGDState",
    "MTSGDState",
    "NonFiniteError",
    "NonFiniteReport",
    "NonFiniteWarning",
    "ParetoMTLState",
    "ParticleSpec",
    "RadialKernel",
    "SOLVERS",
    "SVGDState",
    "SampleResult",
    "SamplerState",
    "SamplingAlgorithm",
    "SteinQuantities",
    "StepInfo",
    "TRANSFORMS",
    "ToyProblem",
    "Trace",
    "TransformSpec",
    "WEIGHTINGS",
    "ZDTProblem",
    "clip_to_box",
    "find_stein_state",
    "flatten_particles",
    "flatten_target_grads",
    "format_spec",
    "gram_matrix",
    "imq",
    "init_flax_particles",
    "init_particles",
    "kernel_matrices",
    "kernel_products",
    "kernel_stein_discrepancy",
    "linear_scalarization",
    "normalize_target_grads",
    "log_prob_value_and_loss_grads",
    "loss_value_and_grads",
    "make_transform",
    "median_bandwidth",
    "mgda",
    "min_norm_weights",
    "moo_svgd",
    "mtsgd",
    "mtsgd_sampler",
    "num_particles",
    "pairwise_sq_dists",
    "pareto_mtl",
    "pareto_mtl_preferences",
    "parse_spec",
    "preference_vectors",
    "project_box",
    "projection_simplex",
    "radial_kernel",
    "rbf",
    "sample",
    "shard_particles",
    "stack_targets",
    "stein_directions",
    "stein_quantities",
    "svgd",
    "target_grad_pieces",
    "toy_problem",
    "unflatten_particles",
    "value_and_grads",
    "zdt",
]
