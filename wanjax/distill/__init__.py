"""Distillation of the pose-conditioned teacher into the causal few-step student (ODE regression, Self-Forcing DMD)."""
