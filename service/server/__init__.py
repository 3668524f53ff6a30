"""The gRPC edge: server lifecycle (`app`), the native and KServe front ends, and the interceptor.

Front ends only translate: they decode wire messages into the core's request types, call the core, and
encode its results. Validation, ordering and state live in `service.core`.
"""

from service.server.app import RunningServer, main, serve, start

__all__ = ["RunningServer", "main", "serve", "start"]
