"""The router the ingress uses to reach the engine replicas: Serve's own, more patient.

Before it sends a request, Serve's router asks the candidate replicas their queue lengths and
passes over one that does not answer in time (0.1 s). For an adapter, Serve then goes at once to
the replicas with the fewest adapters, which load it a second time, and from then on its
requests are split between the two. A replica busy on a shared CPU host misses 0.1 s now and
then, so under load most adapters ended up on both replicas.

This router allows 0.5 s for the queue lengths, and keeps asking the replicas that hold the
adapter until Serve's matching window (1 to 2 s, RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S)
is over; only then does it fall back to Serve's order (the replicas with the fewest adapters, then
any). A request whose adapter's replica is busy waits at most that window for it, where loading
the adapter elsewhere would cost a load and a slot on the second replica.
"""

from __future__ import annotations

import time

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

QUEUE_PROBE_SECONDS = 0.5


class PatientRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's default routing (power of two choices, multiplexed ids first), with a longer
    queue-length deadline (`RequestRouter.queue_len_response_deadline_s`) and no early fallback
    from the replicas that hold a request's adapter."""

    queue_len_response_deadline_s = QUEUE_PROBE_SECONDS

    def apply_multiplex_routing(self, pending_request=None):
        if pending_request is not None:
            context = pending_request.routing_context
            if not context.multiplexed_start_matching_time:
                context.multiplexed_start_matching_time = time.time()
            holders = self._multiplexed_model_id_to_replica_ids.get(pending_request.metadata.multiplexed_model_id)
            waited = time.time() - context.multiplexed_start_matching_time
            if holders and waited < self._multiplexed_matching_timeout:
                context.tried_first_multiplexed_models = True
                context.should_backoff = True
                return set(holders)
        return super().apply_multiplex_routing(pending_request)
