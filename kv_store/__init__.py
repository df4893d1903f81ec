"""Distributed KV-cache store: store nodes (shared-memory arena, LRU, leases), the cluster index,
and the transports that move blocks between nodes and workers.

Modules, one job each:

* ``layout`` (pure)   KVLayout: the block byte layout contract and compatibility check
* ``handle`` (pure)   BlockLocation, KVHandle
* ``slots``  (pure)   slot allocation
* ``node``   (pure)   StoreNode: hash -> slot, LRU eviction, pins, leases (injected clock)
* ``index``  (pure)   KVIndex protocol + InMemoryIndex (longest-prefix lookup)
* ``checksum``        XXH3-64 block checksums: written with every block, verified on Put and on read
* ``auth``            who may call a node: Authorizer protocol, cluster-token check, dev mode
* ``arena``           ShmArena / ArenaReader (shared memory), HeapArena (fake)
* ``store``           BlockStore: node + arena + index, thread-safe, usable in-process
* ``convert``         protobuf <-> the types above
* ``wire``            zero-copy encode/decode of the bulk chunk messages (same wire format)
* ``service``         gRPC servicer, ``serve()``, ``run_store_node()``
* ``client``          KVStoreClient
* ``transport``       BlockTransport: GrpcTransport, ShmTransport, FakeTransport, AutoTransport
* ``tensors``         torch views of block bytes (the only torch import)

Importing ``kv_store`` itself imports nothing heavy.
"""
