"""The gateway on Ray Serve: an ingress deployment with the whole HTTP app (auth, tenancy,
validation, the catalog), in front of N engine replicas reached through a DeploymentHandle.

- `lora-gateway serve --ray --replicas N` runs it on a local Ray that starts and stops with
  the gateway, or on a cluster with --ray-address.
- `serve run server.ray_app:app_builder` and `serve deploy deploy/ray/serve-config.yaml` build
  the same application from the same settings (the config's `args`, or LORA_GATEWAY_* in the
  environment), for clusters that KubeRay manages.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any

from server.config import Settings

logger = logging.getLogger("lora_gateway")

APP_NAME = "lora-gateway"
SHUTDOWN_GRACE_SECONDS = 15


def deployment_options(settings: Settings) -> dict[str, Any]:
    """The engine replicas' Serve options: a fixed count, or autoscaling bounds."""
    options: dict[str, Any] = {
        "name": "engine",
        "ray_actor_options": {"num_cpus": settings.replica_cpus},
        "max_ongoing_requests": max(8, settings.max_num_seqs * 2),
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": settings.drain_seconds,
    }
    if settings.min_replicas is not None:
        autoscaling: dict[str, Any] = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "initial_replicas": max(settings.min_replicas, 1),
        }
        if settings.target_ongoing_requests is not None:
            autoscaling["target_ongoing_requests"] = settings.target_ongoing_requests
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = settings.replicas
    return options


def build_application(settings: Settings, revision: int = 0):
    """The Serve application: the ingress bound to the engine replicas.

    A new `revision` is a new target for Serve, which starts the engine replicas afresh: the way
    out of DEPLOY_FAILED, where Serve keeps a deployment whose replicas failed as they started.
    """
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from server.engine.ray_replica import replica_class

    options = deployment_options(settings)
    # The ingress reaches the replicas through a router that waits longer for their queue lengths.
    options["request_router_config"] = RequestRouterConfig(
        request_router_class="server.engine.ray_router:PatientRouter"
    )
    if revision:
        options["version"] = f"redeploy-{revision}"
    # The Settings object itself travels (pickled by Ray): its JSON would mask the secrets.
    replicas = serve.deployment(replica_class(settings.max_cpu_loras), **options)
    ingress = serve.deployment(
        serve.ingress()(GatewayIngress),
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=settings.max_in_flight + 64,
    )
    return ingress.bind(settings, replicas.bind(settings))


def app_builder(args: dict[str, Any] | None = None):
    """For `serve run server.ray_app:app_builder` and Serve config files: settings from `args`
    (flag names with underscores) over the LORA_GATEWAY_* environment.

    Serve's http_options, not the settings, say where the application listens, so it needs an
    admin key (LORA_GATEWAY_ADMIN_KEY in the environment, never in the config) or allow_open."""
    from server.gateway import StartupError, check_open_mode, with_demo

    settings = Settings(**{"ray": True, **(args or {})})
    try:
        check_open_mode(settings, None)
    except StartupError as exc:
        raise RuntimeError(str(exc)) from None
    return build_application(with_demo(settings))


class GatewayIngress:
    """The HTTP app in a Serve replica, with the engine replicas as its engine."""

    def __init__(self, settings: Settings, replicas: Any):
        import ray
        from transformers import AutoTokenizer

        from server.engine.ray_engine import RayEngine
        from server.engine.ray_replica import BOARD_NAME, BOARD_NAMESPACE, ClusterBoard
        from server.engine.vllm_engine import default_max_model_len
        from server.gateway import StartupError, assemble, prepare
        from server.ops.isolation import withhold_secrets
        from server.ops.logs import configure_logging

        configure_logging(settings.log_level, settings.log_format)
        try:
            prepared = prepare(settings)
        except StartupError as exc:
            raise RuntimeError(str(exc)) from None
        board = (
            ray.remote(ClusterBoard)
            .options(name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True, num_cpus=0)
            .remote()
        )
        # The catalog and the store are open: the fine-tuning workers this replica starts inherit
        # no secret (each worker's environment is filtered too, server/finetune/runners.py).
        withhold_secrets()
        tokenizer = AutoTokenizer.from_pretrained(prepared.model_path)
        max_model_len = settings.max_model_len or default_max_model_len(prepared.model_path)
        self._app = assemble(prepared, RayEngine(replicas, tokenizer, max_model_len, board))

    def __serve_build_asgi_app__(self):
        return self._app


def serve_on_ray(settings: Settings) -> int:
    """Run the application until SIGTERM or SIGINT; a local Ray starts and stops with it."""
    import ray
    from ray import serve

    try:
        with socket.create_server((settings.host, settings.port)):
            pass  # Ray's proxy binds it; a port in use should fail now, not after the engines start
    except OSError as exc:
        print(f"lora-gateway: error: --host/--port: cannot listen on {settings.host}:{settings.port}: {exc}")
        return 2
    from server.gateway import StartupError, prepare
    from server.ops.isolation import STORE_CREDENTIALS, withhold_secrets

    try:
        prepare(settings).catalog.close()  # fail fast on the model, adapters, catalog and store
    except StartupError as exc:
        print(f"lora-gateway: error: {exc}")
        return 2

    # Ray's processes (its node, its workers and whatever they spawn) inherit this environment;
    # the settings reach the replicas as an argument, so only the store's credentials stay in it,
    # for the replicas to open the store with (each withholds them before its engine starts).
    withhold_secrets(os.environ, keep=STORE_CREDENTIALS)
    local = settings.ray_address is None
    extra = {"_metrics_export_port": settings.ray_metrics_port} if local and settings.ray_metrics_port else {}
    ray.init(
        # "local": a Ray of our own, never one that another program started on this machine
        # (ray.init() alone joins the newest local cluster, whose Serve we would then shut down).
        address=settings.ray_address or "local",
        include_dashboard=False,
        **extra,
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=False,
    )
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        logger.info("starting %d engine replicas on Ray", settings.replicas)
        _keep_deployed(settings, stopped)
        logger.info("stopping: the engine replicas finish their requests (up to %.0f s)", settings.drain_seconds)
    finally:
        # Bounded: a Ray whose node process died with the terminal's signal would never answer.
        stopper = threading.Thread(target=_stop_serve, args=(local,), daemon=True)
        stopper.start()
        stopper.join(settings.drain_seconds + SHUTDOWN_GRACE_SECONDS)
        if stopper.is_alive():
            logger.warning("Ray Serve did not stop in time; shutting Ray down anyway")
        ray.shutdown()
    return 0


SUPERVISE_SECONDS = 5.0
REDEPLOY_BACKOFF_SECONDS = (2.0, 5.0, 10.0, 30.0)


def _keep_deployed(settings: Settings, stopped: threading.Event) -> None:
    """Deploy the application, and deploy it again whenever Serve gives up on it, until stopped.

    Serve replaces a replica that dies once it has started; one that dies while the deployment
    is still starting can instead leave it DEPLOY_FAILED (serve.run raises "Failed to update the
    deployments"), and then nothing replaces it. The ingress keeps answering (503 while no engine
    replica is up), and a new revision starts the replicas again.
    """
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    revision = 0
    while not stopped.is_set():
        try:
            serve.run(build_application(settings, revision), name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as exc:  # noqa: BLE001 - Serve raises plain RuntimeErrors and its own types alike
            delay = REDEPLOY_BACKOFF_SECONDS[min(revision, len(REDEPLOY_BACKOFF_SECONDS) - 1)]
            revision += 1
            logger.error("the engine replicas failed to start (%s); deploying them again in %.0f s", exc, delay)
            stopped.wait(delay)
            continue
        logger.info("serving %s on http://%s:%d through Ray Serve", settings.base_name, settings.host, settings.port)
        while not stopped.wait(SUPERVISE_SECONDS):
            try:
                application = serve.status().applications.get(APP_NAME)
            except Exception as exc:  # noqa: BLE001 - the controller may be restarting; look again
                logger.warning("cannot read Ray Serve's status: %s", exc)
                continue
            if application is None or application.status == ApplicationStatus.DEPLOY_FAILED:
                logger.error("Ray Serve gave up on the engine replicas; deploying them again")
                revision += 1
                break


def _stop_serve(local: bool) -> None:
    from ray import serve

    try:
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    except Exception:  # noqa: BLE001 - shutting down: report, and let ray.shutdown() finish
        logger.exception("stopping Ray Serve failed")
