"""The result of a live migration (worker.proto ``MigrationResult``): one enum shared by the decode
workers (which report it) and the router (which acts on it)."""

from __future__ import annotations

import enum

from pdserve.v1 import worker_pb2


class MigrationResult(enum.Enum):
    """``MigrateOutResponse.result``."""

    MIGRATED = worker_pb2.MIGRATION_RESULT_MIGRATED
    ABORTED_DEST_FULL = worker_pb2.MIGRATION_RESULT_ABORTED_DEST_FULL
    ABORTED_SOURCE_FINISHED = worker_pb2.MIGRATION_RESULT_ABORTED_SOURCE_FINISHED
    ABORTED_CANCELLED = worker_pb2.MIGRATION_RESULT_ABORTED_CANCELLED
    ABORTED_PEER_DIED = worker_pb2.MIGRATION_RESULT_ABORTED_PEER_DIED
    # beyond the five the lifecycle needs: still aborts (the request stays on the source)
    ABORTED_SOURCE_PREEMPTED = worker_pb2.MIGRATION_RESULT_ABORTED_SOURCE_PREEMPTED
    ABORTED_REFUSED = worker_pb2.MIGRATION_RESULT_ABORTED_REFUSED

    @property
    def migrated(self) -> bool:
        return self is MigrationResult.MIGRATED
