// The demo page: two tabs open an RTCDataChannel through the chosen questsig mode.
// Query parameters prefill the form: mode, path, room, peer, key, reg, role; auto=1 connects.
// When the server hands out TURN credentials (an entry with mode "turn" in mounts.json), every
// peer connection gets them; relay=1 then forces the data through the TURN server.
import {
  FledgerClient, HubClient, PairRelayClient, RouterClient, SigverClient, linkPeers,
} from "../client.js";

const DEFAULT_MOUNTS = [
  { mode: "hub", path: "/hub" },
  { mode: "pair-relay", path: "/relay" },
  { mode: "router", path: "/router" },
  { mode: "sigver", path: "/sigver" },
  { mode: "fledger", path: "/fledger" },
  { mode: "peerjs", path: "/peerjs" },
];

const MODES = {
  hub: {
    room: "Your name", peer: "Peer's name", call: true,
    make: (base, form) => new HubClient(base, form.room),
    target: (peer) => HubClient.nameOf(peer),
    self: (client) => client.name,
  },
  "pair-relay": {
    room: "Pair id",
    make: (base, form) => new PairRelayClient(base, form.room),
    self: (client) => `${client.paired ? "paired" : "waiting"} on id ${client.id}`,
  },
  router: {
    room: "Registration id", router: true,
    make: (base, form) => new RouterClient(base, {
      id: form.room, key: form.key, sockType: form.reg === "hostclient" ? form.role : null,
    }),
    self: (client) => `${client.sockType ?? "member"} ${client.tag} on ${client.id}`,
  },
  sigver: {
    room: "Group key",
    make: (base, form) => new SigverClient(base, form.room),
    self: (client) => (client.member ? "member" : "joining") + ` of ${client.key}`,
  },
  fledger: {
    room: "Node name", peer: "Peer node id", call: true,
    make: (base, form) => new FledgerClient(base, { name: form.room }),
    self: (client) => client.nodeId ?? "–",
  },
};

const $ = (id) => document.getElementById(id);
let mounts = DEFAULT_MOUNTS;
let turn = null;
let client = null;
let peers = null;
const state = { frames: [], received: [], channel: "closed", opens: 0 };
window.demo = state;

function log(kind, text) {
  const item = document.createElement("li");
  item.className = kind;
  item.textContent = text.length > 600 ? `${text.slice(0, 600)}…` : text;
  $("log").append(item);
  $("log").scrollTop = $("log").scrollHeight;
  state.frames.push({ kind, text });
}

function setText(id, text) {
  $(id).textContent = text;
}

function form() {
  return {
    mode: $("mode").value, path: $("path").value.trim(), room: $("room").value.trim(),
    peer: $("peer").value.trim(), key: $("key").value, reg: $("reg-type").value,
    role: $("sock-type").value,
  };
}

function showMode() {
  const spec = MODES[$("mode").value];
  const mount = mounts.find((m) => m.mode === $("mode").value);
  if (mount && !$("path").value) $("path").value = mount.path;
  setText("room-label", spec.room);
  $("peer-row").hidden = !spec.peer;
  if (spec.peer) setText("peer-label", spec.peer);
  $("router-fields").hidden = !spec.router;
  $("sock-type").disabled = $("reg-type").value !== "hostclient";
}

function socketBase(path) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}${path === "/" ? "" : path.replace(/\/+$/, "")}`;
}

function setChannel(text) {
  state.channel = text;
  setText("channel", text);
  $("channel").className = text;
  $("send").disabled = text !== "open";
}

function watchLink(link) {
  log("note", `peer link to ${link.peer} (${link.initiator ? "calling" : "answering"})`);
  setChannel("connecting");
  link.addEventListener("open", () => {
    setChannel("open");
    log("note", `data channel open with ${link.peer}`);
    if (client instanceof SigverClient) client.stable();
    refreshSelf();
  });
  link.addEventListener("message", (event) => addReceived(String(event.detail.data), false));
  link.addEventListener("close", () => {
    if (![...peers.links.values()].some((l) => l !== link && l.open)) setChannel("closed");
  });
  link.addEventListener("error", (event) => setText("problem", event.detail.message));
}

function addReceived(text, mine) {
  const item = document.createElement("li");
  item.textContent = mine ? `me: ${text}` : text;
  if (mine) item.className = "mine";
  $("received").append(item);
  if (!mine) state.received.push(text);
}

function refreshSelf() {
  if (client) setText("self", MODES[form().mode].self(client));
}

async function connect() {
  const f = form();
  const spec = MODES[f.mode];
  const base = socketBase(f.path || "/");
  setText("problem", "");
  $("connect").disabled = true;
  try {
    if (spec.router && !f.room) {
      f.room = await RouterClient.register(base, { key: f.key, hostKey: f.key, regType: f.reg });
      $("room").value = f.room;
      log("note", `registered id ${f.room}`);
    }
    client = spec.make(base, f);
  } catch (error) {
    setText("problem", String(error.message || error));
    $("connect").disabled = false;
    return;
  }
  state.client = client;
  client.addEventListener("frame", (e) => log(e.detail.direction, e.detail.text));
  client.addEventListener("status", (e) => { setText("signaling", e.detail.text); refreshSelf(); });
  client.addEventListener("problem", (e) => {
    setText("problem", e.detail.message);
    log("note", e.detail.message);
  });
  client.addEventListener("ready", () => {
    state.opens = client.opens;
    setText("signaling", "ready");
    refreshSelf();
    $("call").disabled = !spec.call;
    log("note", `signaling ready (${client.opens === 1 ? "connected" : "reconnected"})`);
  });
  client.addEventListener("disconnected", (e) => {
    const retry = e.detail.retryIn === null ? "" : `, reconnecting in ${e.detail.retryIn} ms`;
    setText("signaling", `disconnected (${e.detail.code}${retry})`);
    log("note", `socket closed ${e.detail.code} ${e.detail.reason}${retry}`);
  });
  client.addEventListener("nodes", (e) => {
    const others = e.detail.nodes.filter((n) => n.id !== client.nodeId);
    if (others.length && !$("peer").value) $("peer").value = others[0].id;
  });
  client.addEventListener("peer", (e) => log("note", `peer ${e.detail.id} reachable`));
  peers = linkPeers(client, { onLink: watchLink, ...iceOptions() });
  state.peers = peers;
  $("disconnect").disabled = false;
  setText("signaling", "connecting");
  try {
    await client.connect();
  } catch (error) {
    setText("problem", String(error.message || error));
  }
}

function iceOptions() {
  if (!turn) return {};
  const relay = new URLSearchParams(location.search).get("relay") === "1";
  log("note", `TURN credentials from ${turn.path}${relay ? ", relay only" : ""}`);
  return {
    turnCredentials: turn.path,
    rtcConfig: relay ? { iceTransportPolicy: "relay" } : {},
  };
}

function disconnect() {
  if (peers) for (const link of peers.links.values()) link.close();
  if (client) client.close();
  client = null;
  peers = null;
  setText("signaling", "not connected");
  setText("self", "–");
  setChannel("closed");
  $("connect").disabled = false;
  $("call").disabled = true;
  $("disconnect").disabled = true;
}

async function start() {
  try {
    const response = await fetch("mounts.json");
    if (response.ok) {
      const listed = await response.json();
      if (listed.length) mounts = listed;
    }
  } catch {
    // served without questsig's mount table: assume the default prefixes
  }
  turn = mounts.find((m) => m.mode === "turn") ?? null;
  state.turn = turn ? turn.path : null;
  setText("turn", turn ? `credentials from ${turn.path}` : "not configured");
  const peerjs = mounts.find((m) => m.mode === "peerjs");
  if (peerjs) {
    // users bring the peerjs library; the mount is its `path` option
    const port = location.port || (location.protocol === "https:" ? "443" : "80");
    setText("peerjs-snippet",
      `new Peer(id, {host: "${location.hostname}", port: ${port}, path: "${peerjs.path}"})`);
    $("peerjs-hint").hidden = false;
  }
  for (const { mode, path } of mounts) {
    if (!MODES[mode] || [...$("mode").options].some((o) => o.value === mode)) continue;
    const option = new Option(`${mode} (${path})`, mode);
    $("mode").append(option);
  }
  const params = new URLSearchParams(location.search);
  if (params.has("mode")) $("mode").value = params.get("mode");
  showMode();
  for (const [param, id] of [["path", "path"], ["room", "room"], ["peer", "peer"], ["key", "key"],
    ["reg", "reg-type"], ["role", "sock-type"]]) {
    if (params.has(param)) $(id).value = params.get(param);
  }
  showMode();
  $("mode").addEventListener("change", () => { $("path").value = ""; showMode(); });
  $("reg-type").addEventListener("change", showMode);
  $("connect").addEventListener("click", connect);
  $("disconnect").addEventListener("click", disconnect);
  $("call").addEventListener("click", () => {
    const { mode, peer } = form();
    const target = MODES[mode].target ?? ((text) => text);
    if (!peer) setText("problem", "enter the peer to call");
    else peers.call(target(peer));
  });
  $("chat").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value;
    if (!peers || !text) return;
    let sent = false;
    for (const link of peers.links.values()) sent = link.send(text) || sent;
    if (sent) {
      addReceived(text, true);
      $("text").value = "";
    }
  });
  state.loaded = true;
  document.body.dataset.loaded = "true";
  if (params.get("auto") === "1") connect();
}

start();
