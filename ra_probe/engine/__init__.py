"""The probe engine: matrix-free Jacobian operators and the solvers that take their SVDs."""
from ra_probe.engine.operators import BatchedOperator, DenseOperator, JacobianOperator
from ra_probe.engine.solvers import SVDResult, dense_svd, lanczos_svd, solve

__all__ = ["BatchedOperator", "DenseOperator", "JacobianOperator", "SVDResult", "dense_svd", "lanczos_svd", "solve"]
