"""Placement policies, pure: no grpc, ray, sockets or torch. The router and the simulator share them.

Entry points: :func:`make_policy` / the policy classes, :class:`ClusterView` over
:class:`InstanceView`s, :class:`RequestInfo` in, :class:`Placement` or :class:`Rejection` out.
"""

from router.policy.estimate import TtftEstimator, usable_prefix_blocks
from router.policy.goodput import ColocatedPolicy, GoodputAwarePolicy, GoodputConfig
from router.policy.latency import (
    CorrectionConfig,
    DecodeLatencyEstimator,
    LinearLatency,
    OnlineCorrectedLatency,
    Phase,
)
from router.policy.length_predictor import (
    LengthAccuracy,
    LengthPredictor,
    LengthPredictorConfig,
    LengthSample,
)
from router.policy.placement import (
    STORE_SOURCE,
    AdmissionHook,
    GlobalCacheAwarePolicy,
    LeastLoadedPolicy,
    LocalCacheAwarePolicy,
    PlacementPolicy,
    PolicyKind,
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
)
from router.policy.protocols import Clock, LatencyEstimator, ManualClock, MonotonicClock
from router.policy.types import (
    SLO,
    Decision,
    InstanceRole,
    Observation,
    Placement,
    Rejection,
    RejectReason,
    RequestInfo,
)
from router.policy.view import ClusterView, InstanceSnapshot, InstanceView

__all__ = [
    "SLO",
    "STORE_SOURCE",
    "ColocatedPolicy",
    "CorrectionConfig",
    "DecodeLatencyEstimator",
    "GoodputAwarePolicy",
    "GoodputConfig",
    "LengthAccuracy",
    "LengthPredictor",
    "LengthPredictorConfig",
    "LengthSample",
    "LinearLatency",
    "Observation",
    "OnlineCorrectedLatency",
    "Phase",
    "AdmissionHook",
    "Clock",
    "ClusterView",
    "Decision",
    "GlobalCacheAwarePolicy",
    "InstanceRole",
    "InstanceSnapshot",
    "InstanceView",
    "LatencyEstimator",
    "LeastLoadedPolicy",
    "LocalCacheAwarePolicy",
    "ManualClock",
    "MonotonicClock",
    "Placement",
    "PlacementPolicy",
    "PolicyKind",
    "RandomPolicy",
    "RejectReason",
    "Rejection",
    "RequestInfo",
    "RoundRobinPolicy",
    "TtftEstimator",
    "make_policy",
    "usable_prefix_blocks",
]
