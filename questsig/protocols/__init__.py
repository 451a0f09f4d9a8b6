"""Autobahn adapters: one protocol (and service) per mode, translating frames to core calls."""
