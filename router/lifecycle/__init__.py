"""A request's lifecycle in the router.

Pure (no gRPC, no threads, no wall clock): the state machine (:mod:`.states`, :mod:`.events`,
:mod:`.actions`, :mod:`.machine`) and the ledger of what a request holds (:mod:`.resources`).
Asyncio, no gRPC: the driver executing it (:mod:`.driver`) over small ports (:mod:`.ports`) and
the live-migration seam (:mod:`.migrator`). The router's implementations of those ports:
worker calls over gRPC (:mod:`.grpc_legs`, :mod:`.grpc_calls`), bookkeeping and replacements
(:mod:`.cluster`, :mod:`.placing`) and the quarantine prober (:mod:`.quarantine_probe`).
"""
