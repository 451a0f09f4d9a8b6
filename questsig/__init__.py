"""questsig: a WebRTC signaling and WebSocket relay server speaking five protocols."""

__version__ = "0.1.0"
