"""weightsync: get model weights onto a volume, verified and atomically published, then exec the server."""

__version__ = "0.1.0"
