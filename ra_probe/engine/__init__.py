"""The probe engine: matrix-free Jacobian operators (operators, linearized), the solvers that take
their SVDs (dense: exact; krylov: block Golub–Kahan–Lanczos; solvers: which one, and the solve),
memory control (memory)."""
from ra_probe.engine.dense import SVDResult, dense_svd
from ra_probe.engine.krylov import default_width, krylov_svd
from ra_probe.engine.memory import auto_batch_size
from ra_probe.engine.operators import BatchedOperator, DenseOperator, JacobianOperator, wide_calls
from ra_probe.engine.solvers import SOLVERS, choose_method, solve, solve_operator

__all__ = ["BatchedOperator", "DenseOperator", "JacobianOperator", "SOLVERS", "SVDResult", "auto_batch_size",
           "choose_method", "default_width", "dense_svd", "krylov_svd", "solve", "solve_operator", "wide_calls"]
