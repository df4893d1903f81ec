"""pdserve: disaggregated prefill/decode LLM serving.

Kept import-light on purpose: ``import pdserve`` pulls in neither torch nor grpc.
"""

__version__ = "0.1.0"
