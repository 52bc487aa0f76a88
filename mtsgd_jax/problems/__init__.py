"""Ready-made multi-target problems."""

from mtsgd_jax.problems.toy import ToyProblem, gaussian_mixture_log_prob, toy_problem

__all__ = ["ToyProblem", "gaussian_mixture_log_prob", "toy_problem"]
