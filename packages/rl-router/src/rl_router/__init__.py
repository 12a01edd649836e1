"""Spreads SGLang `/generate` requests from the rollout side over several engines, via ZeroMQ + msgpack.

Imports neither torch nor rl-core: `EngineAdapter` and `RouterClient` meet rl-core's
`RolloutEngine` Protocol by shape.
"""

from rl_router.busy_poll import BusyPollSelector, busy_poll_loop
from rl_router.cache_aware import CacheAwarePolicy
from rl_router.client import RouterClient
from rl_router.errors import RouterError
from rl_router.faults import EngineEjected, EngineFault, EngineTimeout, is_engine_fault
from rl_router.loading import load_middleware
from rl_router.metrics import MetricsMiddleware
from rl_router.policies import LeastOutstandingPolicy, RoundRobinPolicy, RoutingPolicy, make_policy
from rl_router.protocols import CallNext, EngineAdapter, Middleware, RouterRequest
from rl_router.request_log import RequestLogMiddleware
from rl_router.router import Router
from rl_router.thread import RouterThread
from rl_router.trajectory import Trajectory, TrajectoryMiddleware, TrajectoryTree

__all__ = [
    "BusyPollSelector",
    "CacheAwarePolicy",
    "CallNext",
    "EngineAdapter",
    "EngineEjected",
    "EngineFault",
    "EngineTimeout",
    "LeastOutstandingPolicy",
    "MetricsMiddleware",
    "Middleware",
    "RequestLogMiddleware",
    "RoundRobinPolicy",
    "Router",
    "RouterClient",
    "RouterError",
    "RouterRequest",
    "RouterThread",
    "RoutingPolicy",
    "Trajectory",
    "TrajectoryMiddleware",
    "TrajectoryTree",
    "busy_poll_loop",
    "is_engine_fault",
    "load_middleware",
    "make_policy",
]
__version__ = "0.1.0"
