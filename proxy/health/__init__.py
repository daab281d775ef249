"""Route health: a circuit breaker per route (upstream + upstream model).

`breaker` holds the pure state machine, `verdict` what an upstream's answer says about
its route, `board` the process's view (plan ordering, probes, recent stats) over a
store of breaker states: in memory, or shared by every process through Redis
(`shared`). The forwarder asks the board to arrange a plan and reports each attempt's
outcome back; nothing else of the pipeline knows about breakers.
"""

from proxy.health.board import RouteHealth, RouteKey, RouteView
from proxy.health.breaker import BreakerState, Policy
from proxy.health.verdict import Failure, failure_for_status, retry_after_s

__all__ = [
    "BreakerState", "Failure", "Policy", "RouteHealth", "RouteKey", "RouteView", "failure_for_status", "retry_after_s",
]
