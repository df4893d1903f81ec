"""A request's lifecycle in the router: a pure state machine (:mod:`.states`, :mod:`.events`,
:mod:`.actions`, :mod:`.machine`, :mod:`.resources`), the driver executing it over small ports
(:mod:`.driver`, :mod:`.ports`, :mod:`.migrator`), and the gRPC implementations of those ports
the router's servicer uses (:mod:`.grpc_legs`, :mod:`.grpc_calls`, :mod:`.cluster`)."""
