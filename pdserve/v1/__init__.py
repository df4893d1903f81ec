"""Generated protobuf / gRPC code of ``proto/pdserve/v1`` (regenerate: ``python scripts/gen_protos.py``)."""
