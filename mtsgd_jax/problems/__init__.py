"""Ready-made multi-target problems: the paper's three-target toy problem and the ZDT benchmarks."""

from mtsgd_jax.problems.toy import ToyProblem, gaussian_mixture_log_prob, toy_problem
from mtsgd_jax.problems.zdt import ZDT3_SEGMENTS, ZDT_NAMES, ZDTProblem, zdt, zdt1, zdt2, zdt3, zdt_front_points

__all__ = [
    "ToyProblem",
    "ZDT3_SEGMENTS",
    "ZDT_NAMES",
    "ZDTProblem",
    "gaussian_mixture_log_prob",
    "toy_problem",
    "zdt",
    "zdt1",
    "zdt2",
    "zdt3",
    "zdt_front_points",
]
