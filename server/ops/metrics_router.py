"""GET /metrics: the gateway's series and vLLM's, in Prometheus' text format.

They name every tenant's adapters, so with --admin-key it takes that key or --metrics-key.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from server.http.deps import require_metrics_reader
from server.ops.metrics_lora_info import LoraInfoView

router = APIRouter()


@router.get("/metrics", response_model=None, include_in_schema=False, dependencies=[Depends(require_metrics_reader)])
async def metrics(request: Request) -> Response:
    # Async on purpose: the registry gauges are read on the event loop, never beside it.
    ours = generate_latest(request.app.state.metrics.registry)
    # The default REGISTRY holds vLLM's vllm:* series (recorded in this process) and process_*;
    # vllm:lora_requests_info names adapters as clients do, for LoRA-aware endpoint pickers.
    theirs = generate_latest(LoraInfoView(REGISTRY, request.app.state.registry.base.adapter_id))
    return Response(ours + theirs, media_type=CONTENT_TYPE_PLAIN_0_0_4)
