// The real PeerJS server (peer 1.0.2) on 127.0.0.1 for the differential test.
// usage: node server.cjs PATH SETTINGS_JSON; prints "listening PORT" once it accepts.
const { PeerServer } = require("peer");

const path = process.argv[2] || "/";
const settings = JSON.parse(process.argv[3] || "{}");
// as upstream's own command line does, so that a bad frame costs one client, not the process
process.on("uncaughtException", (e) => console.error("Error: " + e));
PeerServer({ host: "127.0.0.1", port: 0, path, ...settings }, (server) => {
  console.log("listening " + server.address().port);
});
