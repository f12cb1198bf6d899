"""The layer that ties the stages together for fleets: Ray aggregation and solves (``fleet``),
the placement service (``app``, ``store``, ``jobs``: ``moeplace serve``) and its ``Client``."""

from moeplace.service.client import Client, ServiceError  # httpx is imported on first use

__all__ = ["Client", "ServiceError"]
