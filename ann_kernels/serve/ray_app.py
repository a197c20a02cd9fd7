"""Replicas on Ray Serve (optional extra ``pip install 'ann_kernels[ray]'``).

:func:`server_deployment` wraps any of our servers: each replica calls ``server_factory()``
once (an :class:`~ann_kernels.inference.EarlyExitServer`, not started, or an LM's
``GenerationServer``), starts it, and serves the same
FastAPI app as a single process (:func:`~ann_kernels.serve.create_app`: ``/predict``,
``/v2/...``, ``/metrics`` of that replica) through ``@serve.ingress``. Requests reach the
server's own stage batcher through ``asyncio.wrap_future(server.submit(x))`` (no second
batcher such as ``@serve.batch``), and ``max_ongoing_requests`` is raised from Ray's default
of 5 so that the batcher sees real load. ``check_health`` fails (Ray restarts the replica)
once the server stops serving. An LM's :class:`~ann_kernels.generation.GenerationServer` is
wrapped the same way (``create_app`` then serves the OpenAI routes; ``serve --backend ray`` on
an LM checkpoint, :func:`ann_kernels.serve.lm_command.serve_lm_on_ray`). A replica that dies fails the requests it held (Ray's proxy
answers 500): they are never left without an answer.

:func:`local_ray` starts a local instance on loopback only: it sets :data:`RAY_LOOPBACK_ENV`
before Ray is imported (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray use 127.0.0.1 for
every socket instead of the machine's address; no usage stats; no auth token written under
``~/.ray``), passes ``include_dashboard=False`` and always shuts Serve and Ray down.

Following Ray Serve's ``doc/source/serve/configure-serve-deployment.md`` (deployment options)
and ``python/ray/serve/api.py:ingress`` (``__serve_build_asgi_app__``: the app is built on the
replica, after its constructor).
"""

from __future__ import annotations

import contextlib
import os
import sys

from ann_kernels.serve.state import server_is_closing

__all__ = ["RAY_LOOPBACK_ENV", "local_ray", "replica_cpus", "require_ray", "run_until_signal", "server_deployment"]

RAY_LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray socket on 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}
DEFAULT_MAX_ONGOING_REQUESTS = 1024


def require_ray():
    """(ray, ray.serve) with :data:`RAY_LOOPBACK_ENV` set first; ImportError saying how to
    install them; RuntimeError if Ray was imported earlier without the loopback setting."""
    if "ray" not in sys.modules:
        os.environ.update(RAY_LOOPBACK_ENV)
    try:
        import ray
        from ray import serve
        from ray._private import ray_constants
    except ImportError as error:
        raise ImportError("serve --backend ray: needs Ray Serve: pip install 'ann_kernels[ray]'") from error
    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("ray: imported before ann_kernels.serve.ray_app set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; "
                           "Ray would bind the machine's address: set it in the environment before importing ray")
    return ray, serve


def replica_cpus(replicas: int, cpus: int | None = None) -> float:
    """CPUs a replica reserves: half a core each on a 2-core machine with 2 replicas, at most 1
    (the rest stays with Ray's controller and HTTP proxy)."""
    cpus = cpus or os.cpu_count() or 1
    return min(1.0, cpus / (2.0 * replicas))


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, *, host: str = "127.0.0.1", port: int = 8000):
    """A local Ray instance with Serve's HTTP proxy on ``host:port``; yields ``ray.serve``.
    Always shuts Serve and Ray down on exit."""
    ray, serve = require_ray()
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        yield serve
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def server_deployment(server_factory, *, replicas: int = 1, num_cpus: float | None = None,
                      max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS, drain_timeout_s: float = 30.0,
                      name: str = "ann_kernels", app_options: dict | None = None):
    """A bound Ray Serve application (pass to ``serve.run``) of ``replicas`` replicas, each
    serving ``server_factory()`` with :func:`~ann_kernels.serve.create_app` (``app_options`` are
    its keyword arguments, e.g. ``model_name``). ``server_factory`` is pickled to the replicas
    (a module-level function or ``functools.partial``). ``num_cpus`` per replica (default
    :func:`replica_cpus`); ``drain_timeout_s``: Ray's graceful shutdown wait for a replica."""
    _, serve = require_ray()
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas: expected a positive int, got {replicas!r}")
    if not callable(server_factory):
        raise TypeError(f"server_factory: expected a callable returning a server, got {type(server_factory).__name__}")
    options = dict(app_options or {})

    class ServerReplica:
        """One server per Ray Serve replica (module docstring)."""

        def __init__(self, factory, app_options: dict) -> None:
            self.server = factory()
            self.server.start()
            self.app_options = app_options

        def __serve_build_asgi_app__(self):
            from ann_kernels.serve.app import create_app

            return create_app(self.server, **self.app_options)

        def check_health(self) -> None:
            if server_is_closing(self.server):
                raise RuntimeError("server: stopped serving on this replica")

        def __del__(self) -> None:
            server = getattr(self, "server", None)
            if server is not None:
                server.close(timeout=drain_timeout_s)

    deployment = serve.deployment(
        serve.ingress()(ServerReplica), name=name, num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": replica_cpus(replicas) if num_cpus is None else num_cpus},
        graceful_shutdown_timeout_s=drain_timeout_s, health_check_period_s=2.0)
    return deployment.bind(server_factory, options)


def run_until_signal(application, *, name: str, host: str, port: int, banner: str) -> int:
    """The ``serve --backend ray`` driver: a :func:`local_ray` instance on ``host:port``, run
    ``application`` (from :func:`server_deployment`) under ``name`` at ``/``, print
    ``banner``, wait for SIGTERM or SIGINT; leaving :func:`local_ray` drains the replicas
    (Ray Serve's graceful shutdown) and stops Ray. The exit status (0)."""
    import signal
    import threading

    stop = threading.Event()
    with local_ray(host=host, port=port) as serve:
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        serve.run(application, name=name, route_prefix="/", blocking=False)
        print(banner, flush=True)
        stop.wait()
        print("stopping: Ray Serve drains the replicas, then Ray shuts down", flush=True)
    return 0
