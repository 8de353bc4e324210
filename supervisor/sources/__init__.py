"""Listener sources: each turns what a runtime hands over into sessions of the one server."""
