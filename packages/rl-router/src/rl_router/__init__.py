"""Spreads SGLang `/generate` requests from the rollout side over several engines, via ZeroMQ + msgpack.

Imports neither torch nor rl-core: `EngineAdapter` and `RouterClient` meet rl-core's
`RolloutEngine` Protocol by shape.
"""

from rl_router.client import RouterClient
from rl_router.errors import RouterError
from rl_router.loading import load_middleware
from rl_router.metrics import MetricsMiddleware
from rl_router.policies import LeastOutstandingPolicy, RoundRobinPolicy, RoutingPolicy, make_policy
from rl_router.protocols import CallNext, EngineAdapter, Middleware, RouterRequest
from rl_router.request_log import RequestLogMiddleware
from rl_router.router import Router
from rl_router.thread import RouterThread

__all__ = [
    "CallNext",
    "EngineAdapter",
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
    "load_middleware",
    "make_policy",
]
__version__ = "0.1.0"
