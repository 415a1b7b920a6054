"""Coordination between gateway instances: per-session locks, leases and change notices.

`Coordinator` is the one interface; `LocalCoordinator` serves a single process (the default,
costing nothing beyond an in-memory lock), and `PostgresCoordinator` (coordination.postgres)
makes several instances on one PostgreSQL database cooperate.
"""

from chatgateway.coordination.base import ChangeListener, Coordinator, Lease
from chatgateway.coordination.local import LocalCoordinator

__all__ = ["ChangeListener", "Coordinator", "Lease", "LocalCoordinator"]
