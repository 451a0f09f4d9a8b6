from twisted.application.service import ServiceMaker

questsig = ServiceMaker(
    "questsig",
    "questsig.tap",
    "WebRTC signaling and WebSocket relay server (hub, pair-relay, router, sigver, fledger)",
    "questsig",
)
