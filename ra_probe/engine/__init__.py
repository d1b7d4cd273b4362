"""The probe engine: matrix-free Jacobian operators, the solvers that take their SVDs, memory control."""
from ra_probe.engine.memory import auto_batch_size
from ra_probe.engine.operators import BatchedOperator, DenseOperator, JacobianOperator
from ra_probe.engine.solvers import (
                                     SOLVERS,
                                     SVDResult,
                                     block_krylov_svd,
                                     choose_method,
                                     default_block,
                                     dense_svd,
                                     krylov_svd,
                                     solve,
)

__all__ = ["BatchedOperator", "DenseOperator", "JacobianOperator", "SOLVERS", "SVDResult", "auto_batch_size",
           "block_krylov_svd", "choose_method", "default_block", "dense_svd", "krylov_svd", "solve"]
