"""A Python client for the service: sessions as context managers, safe retries by ``seq``."""

from client.client import APIError, AsyncLSTMClient, AsyncSession, LSTMClient, Session

__all__ = ["APIError", "AsyncLSTMClient", "AsyncSession", "LSTMClient", "Session"]
