"""The router the ingress uses to reach the engine replicas: Serve's own, more patient.

Before it sends a request, Serve's router asks the candidate replicas their queue lengths and
passes over one that does not answer in time (0.1 s). An adapter request whose replica is passed
over goes to the replicas with the fewest adapters, which load it a second time, and from then on
its requests are split between the two. A replica busy on a shared CPU host misses 0.1 s; this
router allows 0.5 s, which costs a slow replica's requests at most the difference.
"""

from __future__ import annotations

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

QUEUE_PROBE_SECONDS = 0.5


class PatientRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's default routing (power of two choices, multiplexed ids first), with a longer
    queue-length deadline (`RequestRouter.queue_len_response_deadline_s`)."""

    queue_len_response_deadline_s = QUEUE_PROBE_SECONDS
