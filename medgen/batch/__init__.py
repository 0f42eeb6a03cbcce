"""Running per-study pipelines over a scan archive: the driver, executors and report.

``run_batch`` (also ``medgen batch``) is the entry point; ``medgen status`` reads the ledger.
"""

from medgen.batch.driver import BatchSummary, run_batch

__all__ = ["BatchSummary", "run_batch"]
