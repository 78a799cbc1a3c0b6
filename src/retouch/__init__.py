"""Retouch: a self-hostable server for the qwen-image-edit async task API."""

__version__ = "0.1.0"
