// questsig browser client: one class per signaling mode, and PeerLink, which opens an
// RTCDataChannel through any of them. No dependencies; import it as an ES module:
//
//   import { HubClient, linkPeers } from "/client.js";
//   const hub = new HubClient("wss://sig.example.org/hub", "alice");
//   const peers = linkPeers(hub);                 // answers offers, calls on request
//   await hub.connect();
//   peers.call("bob").addEventListener("open", e => e.target.send("hi"));
//
// Every class is an EventTarget with the same events (CustomEvent, fields in `detail`):
//   ready        the connection can carry signals (re-fired after each reconnect)
//   signal       {from, data}: data is {type: "offer"|"answer", sdp}, {type: "candidate",
//                candidate} or {type: "hello"} (a peer asks to be called)
//   peer         {id, initiator}: a peer is reachable; initiator says this side should offer
//   peer-left    {id}
//   status       {text}       mode-specific state, for display
//   problem      {message}    an error the server reported, or a refused request
//   frame        {direction: "in"|"out", text}: every frame, for display
//   disconnected {code, reason, retryIn}: retryIn is null when no reconnect follows
// and the same methods: connect() (resolves at the first "ready"), signal(to, data), close().
// Reconnection uses exponential back-off with jitter: `reconnectDelay` ms doubling up to
// `reconnectMaxDelay` ms, reset by every successful open.
//
// Behind symmetric NATs peers need a TURN relay; with questsig's [turn] table configured,
//   linkPeers(hub, { turnCredentials: "https://sig.example.org/turn-credentials" })
// fetches short-lived TURN credentials and gives them to every RTCPeerConnection.

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function unhex(text) {
  if (typeof text !== "string" || text.length % 2 || /[^0-9a-fA-F]/.test(text)) {
    throw new Error("not a hex string");
  }
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.substr(i * 2, 2), 16);
  return out;
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function isSignal(data) {
  return data !== null && typeof data === "object" && typeof data.type === "string";
}

/** The connection, reconnection and event plumbing every mode shares. */
export class SignalingClient extends EventTarget {
  constructor(base, options = {}) {
    super();
    // "wss://host/hub/" and "wss://host/hub" name the same mount
    this.base = String(base).replace(/\/+$/, "");
    this.reconnect = options.reconnect ?? true;
    this.reconnectDelay = options.reconnectDelay ?? 500;
    this.reconnectMaxDelay = options.reconnectMaxDelay ?? 30000;
    this.attempt = 0;
    this.opens = 0;
    this.socket = null;
    this.stopped = true;
    this.timer = null;
    this.isReady = false;
  }

  /** The WebSocket URL to open; each mode builds its own. */
  url() {
    throw new Error("not implemented");
  }

  connect() {
    if (this.isReady) return Promise.resolve(this);
    const ready = new Promise((resolve, reject) => {
      const onReady = () => { this.removeEventListener("stopped", onStop); resolve(this); };
      const onStop = () => {
        this.removeEventListener("ready", onReady);
        reject(new Error("closed"));
      };
      this.addEventListener("ready", onReady, { once: true });
      this.addEventListener("stopped", onStop, { once: true });
    });
    if (this.stopped) {
      this.stopped = false;
      this.open();
    }
    return ready;
  }

  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
    const socket = this.socket;
    this.socket = null;
    this.isReady = false;
    if (socket) socket.close(1000);
    this.emit("stopped");
  }

  get connected() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  open() {
    let socket;
    try {
      socket = new WebSocket(this.url());
    } catch (error) {
      // a malformed URL never gets better by retrying
      this.emit("problem", { message: String(error.message || error) });
      this.close();
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.onopen = () => {
      if (socket !== this.socket) return;
      this.attempt = 0;
      this.opens += 1;
      this.opened();
    };
    socket.onmessage = (event) => {
      if (socket !== this.socket) return;
      const data = typeof event.data === "string" ? event.data : new Uint8Array(event.data);
      this.emit("frame", { direction: "in", text: this.describe(data) });
      this.received(data);
    };
    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.isReady = false;
      this.lost(event);
      let retryIn = null;
      if (!this.stopped && this.reconnect && this.shouldReconnect(event)) {
        const delay = Math.min(this.reconnectMaxDelay, this.reconnectDelay * 2 ** this.attempt);
        retryIn = Math.round(delay * (0.5 + Math.random() / 2));
        this.attempt += 1;
        this.timer = setTimeout(() => {
          this.timer = null;
          if (!this.stopped) this.open();
        }, retryIn);
      }
      this.emit("disconnected", { code: event.code, reason: event.reason, retryIn });
      if (retryIn === null && !this.stopped) this.close();
    };
  }

  /** Send one frame (a string or bytes) if the socket is open; says whether it was sent. */
  sendFrame(data) {
    if (!this.connected) return false;
    this.socket.send(data);
    this.emit("frame", { direction: "out", text: this.describe(data) });
    return true;
  }

  markReady() {
    this.isReady = true;
    this.emit("ready");
  }

  // -- for subclasses --------------------------------------------------------------------------

  opened() {
    this.markReady();
  }

  received(data) {}

  lost(event) {}

  shouldReconnect(event) {
    return true;
  }

  describe(data) {
    return typeof data === "string" ? data : `(${data.length} bytes) ${hex(data.subarray(0, 64))}`;
  }
}

// -- hub (rustysignal) ---------------------------------------------------------------------------

/**
 * Mode `hub`: register a name with `?user=NAME`, send one-to-one JSON messages by name.
 * The server forwards bytes and names no sender, so each message carries `from`. Names are
 * sent percent-encoded and the hub compares them as sent, so `name` is that encoded form;
 * address someone by the text they chose with `HubClient.nameOf(text)`.
 */
export class HubClient extends SignalingClient {
  constructor(base, name, options = {}) {
    super(base, options);
    this.name = HubClient.nameOf(name);
    this.anonymous = false;
  }

  /** The name the hub registers for a client that chose `text`. */
  static nameOf(text) {
    return encodeURIComponent(text);
  }

  url() {
    return `${this.base}/?user=${this.name}`;
  }

  opened() {
    this.anonymous = false;
    super.opened();
  }

  signal(to, data) {
    // `endpoint` for master, `to` for 2.0.2: both, so any `target-field` setting routes it
    return this.sendFrame(JSON.stringify({
      protocol: "one-to-one", endpoint: to, to, from: this.name, action: data.type, data,
    }));
  }

  /** A one-to-all message: every hub connection, this one included, gets it. */
  broadcast(data) {
    return this.sendFrame(JSON.stringify({ protocol: "one-to-all", from: this.name, data }));
  }

  received(data) {
    const text = typeof data === "string" ? data : fromUtf8.decode(data);
    const message = parseJson(text);
    if (message === undefined || message === null || typeof message !== "object") {
      // the hub's errors are plain-text frames
      if (text === "The username is taken") this.anonymous = true;
      this.emit("problem", { message: text });
      return;
    }
    if (message.protocol === "error") {
      this.emit("problem", { message: String(message.message) });
    } else if (typeof message.from === "string" && isSignal(message.data)) {
      if (message.protocol === "one-to-all") {
        if (message.from !== this.name) {
          this.emit("broadcast", { from: message.from, data: message.data });
        }
      } else {
        this.emit("signal", { from: message.from, data: message.data });
      }
    }
  }
}

// -- pair-relay (rust-websocket-relay) -----------------------------------------------------------

const RELAY_ERROR = /^\/error:(\d{4}):([^:]*):/;

/**
 * Mode `pair-relay`: clients on one id pair off two at a time; text goes to the partner.
 * The partner has no name: signals come from, and go to, the peer id "remote". The client
 * that was waiting when its partner arrived gets `/remote:open` and is the one to offer.
 */
export class PairRelayClient extends SignalingClient {
  static PEER = "remote";

  constructor(base, id, options = {}) {
    super(base, options);
    this.id = id;
    this.paired = false;
    this.partnerJoined = false;
  }

  url() {
    return `${this.base}/${encodeURIComponent(this.id)}`;
  }

  signal(to, data) {
    return this.sendFrame(JSON.stringify(data));
  }

  opened() {
    this.paired = false;
    this.partnerJoined = false;
    super.opened();
  }

  lost() {
    if (this.paired) this.emit("peer-left", { id: PairRelayClient.PEER });
    this.paired = false;
  }

  received(data) {
    if (typeof data !== "string") return;
    if (data === "/status:waiting") {
      this.paired = false;
      this.emit("status", { text: "waiting" });
    } else if (data === "/remote:open") {
      this.partnerJoined = true;
    } else if (data === "/status:connected") {
      this.paired = true;
      this.emit("status", { text: "connected" });
      this.emit("peer", { id: PairRelayClient.PEER, initiator: this.partnerJoined });
      this.partnerJoined = false;
    } else if (data === "/remote:close") {
      this.paired = false;
      this.emit("peer-left", { id: PairRelayClient.PEER });
    } else if (RELAY_ERROR.test(data)) {
      const [, code, message] = RELAY_ERROR.exec(data);
      this.emit("problem", { message: `${code}: ${message}` });
    } else {
      const message = parseJson(data);
      if (isSignal(message)) this.emit("signal", { from: PairRelayClient.PEER, data: message });
    }
  }
}

// -- router (ws_router lobby and host-client) ----------------------------------------------------

/**
 * Modes `lobby` and `host-client`: register an id over HTTP, then open `/connect` on it.
 * The router relays to every other member (lobby) or across roles (host-client) and says
 * nothing itself, so each client picks a random tag, addresses signals by tag, and announces
 * itself with a "hello" that existing members answer by calling.
 */
export class RouterClient extends SignalingClient {
  constructor(base, { id, key, sockType = null, ...options }) {
    super(base, options);
    this.id = id;
    this.key = key;
    this.sockType = sockType;
    this.tag = hex(crypto.getRandomValues(new Uint8Array(8)));
  }

  static httpBase(base) {
    return String(base).replace(/^ws/, "http").replace(/\/+$/, "");
  }

  /** GET /register; resolves to the id the router gave (it may differ from `idReq`). */
  static async register(base, { key, hostKey, regType = "lobby", idReq = null }) {
    const query = new URLSearchParams({ key, host_key: hostKey, reg_type: regType });
    if (idReq) query.set("id_req", idReq);
    const response = await fetch(`${RouterClient.httpBase(base)}/register?${query}`);
    const body = await response.text();
    if (!response.ok) throw new Error(`register: ${response.status} ${body}`);
    return body;
  }

  /** GET /remove: deletes the registration and closes its sockets. */
  static async remove(base, { id, key, hostKey }) {
    const query = new URLSearchParams({ id, key, host_key: hostKey });
    const response = await fetch(`${RouterClient.httpBase(base)}/remove?${query}`);
    if (!response.ok) throw new Error(`remove: ${response.status} ${await response.text()}`);
  }

  url() {
    const query = new URLSearchParams({ id: this.id, key: this.key });
    if (this.sockType) query.set("sock_type", this.sockType);
    return `${this.base}/connect?${query}`;
  }

  opened() {
    super.opened();
    this.sendFrame(JSON.stringify({ from: this.tag, to: null, signal: { type: "hello" } }));
  }

  signal(to, data) {
    return this.sendFrame(JSON.stringify({ from: this.tag, to, signal: data }));
  }

  received(data) {
    if (typeof data !== "string") return;
    const message = parseJson(data);
    if (!message || typeof message.from !== "string" || !isSignal(message.signal)) return;
    if (message.to !== null && message.to !== this.tag) return;
    if (message.signal.type === "hello") {
      this.emit("peer", { id: message.from, initiator: true });
    } else {
      this.emit("signal", { from: message.from, data: message.signal });
    }
  }

  shouldReconnect(event) {
    // removed on purpose: the id is gone
    return !(event.code === 1000 && event.reason === "registration removed");
  }
}

// -- sigver (Netflux) ----------------------------------------------------------------------------

// The tiny protobuf subset sigver uses (proto3):
//   Message { oneof { Content content = 1; bool isFirst = 2; bool stable = 3;
//                     bool heartbeat = 4; bool tryAnother = 5; } }
//   Content { uint32 id = 1; bytes data = 2; bool isError = 3; bool isEnd = 4; }

class ProtoWriter {
  constructor() {
    this.parts = [];
    this.length = 0;
  }

  varint(value) {
    const bytes = [];
    // arithmetic, not bit operators: ids go up to 2^32 - 1
    while (value > 127) {
      bytes.push((value % 128) + 128);
      value = Math.floor(value / 128);
    }
    bytes.push(value);
    return this.raw(Uint8Array.from(bytes));
  }

  raw(bytes) {
    this.parts.push(bytes);
    this.length += bytes.length;
    return this;
  }

  field(number, wireType) {
    return this.varint(number * 8 + wireType);
  }

  bool(number, value) {
    return value ? this.field(number, 0).varint(1) : this;
  }

  bytes(number, bytes) {
    return this.field(number, 2).varint(bytes.length).raw(bytes);
  }

  finish() {
    const out = new Uint8Array(this.length);
    let at = 0;
    for (const part of this.parts) {
      out.set(part, at);
      at += part.length;
    }
    return out;
  }
}

function readFields(bytes) {
  const fields = [];
  let at = 0;
  const varint = () => {
    let value = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (at >= bytes.length) throw new Error("truncated varint");
      const b = bytes[at++];
      value += (b & 0x7f) * scale;
      if (b < 0x80) return value;
      scale *= 128;
    }
    throw new Error("varint too long");
  };
  while (at < bytes.length) {
    const key = varint();
    const number = Math.floor(key / 8);
    const wireType = key % 8;
    if (number === 0) throw new Error("field number 0");
    if (wireType === 0) {
      fields.push({ number, value: varint() });
    } else if (wireType === 2) {
      const length = varint();
      if (at + length > bytes.length) throw new Error("truncated field");
      fields.push({ number, value: bytes.subarray(at, at + length) });
      at += length;
    } else if (wireType === 1 || wireType === 5) {
      at += wireType === 1 ? 8 : 4;
      if (at > bytes.length) throw new Error("truncated field");
    } else {
      throw new Error(`unsupported wire type ${wireType}`);
    }
  }
  return fields;
}

const SIGVER_FLAGS = new Map([[2, "isFirst"], [3, "stable"], [4, "heartbeat"], [5, "tryAnother"]]);

/** Encode a sigver `Message`: {content: {id, data, isError, isEnd}} or one of the flags. */
export function encodeSigver(message) {
  const w = new ProtoWriter();
  if (message.content) {
    const c = message.content;
    const inner = new ProtoWriter();
    if (c.id) inner.field(1, 0).varint(c.id);
    if (c.data && c.data.length) inner.bytes(2, c.data);
    inner.bool(3, c.isError).bool(4, c.isEnd);
    w.bytes(1, inner.finish());
  } else {
    // proto3 writes a false bool as nothing; a oneof member is written even when false
    for (const [number, name] of SIGVER_FLAGS) {
      if (name in message) w.field(number, 0).varint(message[name] ? 1 : 0);
    }
  }
  return w.finish();
}

/** Decode a sigver `Message`; throws on bytes that are not one. The last oneof member wins. */
export function decodeSigver(bytes) {
  let message = {};
  for (const { number, value } of readFields(bytes)) {
    if (number === 1 && value instanceof Uint8Array) {
      const content = { id: 0, data: new Uint8Array(0), isError: false, isEnd: false };
      for (const f of readFields(value)) {
        if (f.number === 1 && typeof f.value === "number") content.id = f.value % 2 ** 32;
        else if (f.number === 2 && f.value instanceof Uint8Array) content.data = f.value;
        else if (f.number === 3 && typeof f.value === "number") content.isError = f.value !== 0;
        else if (f.number === 4 && typeof f.value === "number") content.isEnd = f.value !== 0;
      }
      message = { content };
    } else if (number >= 2 && number <= 5 && typeof value === "number") {
      message = { [SIGVER_FLAGS.get(number)]: value !== 0 };
    } else if (number <= 5) {
      throw new Error(`field ${number} has the wrong wire type`);
    }
  }
  return message;
}

/**
 * Mode `sigver` (Netflux): peers sharing a key form a group. The first is a member; each
 * newcomer is bound to one member, offers to it (peer id "member") and calls `stable()` once
 * its data channel is open, becoming a member itself. A member sees each joiner under the
 * numeric routing id the server gave it. Heartbeats are answered automatically.
 */
export class SigverClient extends SignalingClient {
  static MEMBER = "member";

  constructor(base, key, options = {}) {
    super(base, options);
    this.key = key;
    this.member = false;
  }

  url() {
    return `${this.base}/${encodeURIComponent(this.key)}`;
  }

  describe(data) {
    if (typeof data === "string") return data;
    try {
      const message = decodeSigver(data);
      if (message.content) {
        const { id, data: payload, isError, isEnd } = message.content;
        const shown = { id, data: fromUtf8.decode(payload) };
        if (isError) shown.isError = true;
        if (isEnd) shown.isEnd = true;
        return JSON.stringify({ content: shown });
      }
      return JSON.stringify(message);
    } catch {
      return super.describe(data);
    }
  }

  send(message) {
    return this.sendFrame(encodeSigver(message));
  }

  signal(to, data) {
    // a joiner that became a member still reaches the member it joined through with id 0
    const id = to === SigverClient.MEMBER ? 0 : Number(to);
    if (!Number.isInteger(id) || id < 0 || id >= 2 ** 32) return false;
    return this.send({ content: { id, data: utf8.encode(JSON.stringify(data)) } });
  }

  /** Tell the server this joiner is now connected to the group. */
  stable() {
    if (this.member) return false;
    this.member = true;
    this.emit("status", { text: "member" });
    return this.send({ stable: true });
  }

  /** Ask to be bound to another member (the current one did not answer). */
  tryAnother() {
    return this.send({ tryAnother: true });
  }

  opened() {
    // ready only once the server says whether this peer is first
    this.member = false;
  }

  received(data) {
    if (typeof data === "string") return;
    let message;
    try {
      message = decodeSigver(data);
    } catch {
      return;
    }
    if ("isFirst" in message) {
      this.member = message.isFirst;
      this.emit("status", { text: message.isFirst ? "member" : "joining" });
      if (!this.isReady) this.markReady();
      if (!message.isFirst) this.emit("peer", { id: SigverClient.MEMBER, initiator: true });
    } else if (message.heartbeat) {
      this.send({ heartbeat: true });
    } else if (message.content) {
      const { id, data: payload, isError, isEnd } = message.content;
      const from = id === 0 ? SigverClient.MEMBER : id;
      if (payload.length) {
        const signal = parseJson(fromUtf8.decode(payload));
        if (isSignal(signal)) this.emit("signal", { from, data: signal });
      }
      if (isError || isEnd || !payload.length) this.emit("peer-left", { id: from });
    }
  }

  shouldReconnect(event) {
    return event.code !== 4001; // a bad key stays bad
  }
}

// -- fledger (flsignal) --------------------------------------------------------------------------

/** Whether this browser signs with Ed25519 through WebCrypto. */
export async function ed25519Supported() {
  try {
    const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
    await crypto.subtle.sign({ name: "Ed25519" }, pair.privateKey, new Uint8Array(32));
    return true;
  } catch {
    return false;
  }
}

/** A WebCrypto Ed25519 signer: {publicKey: 32 bytes, sign(bytes) -> 64 bytes}. */
export async function webCryptoSigner() {
  const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
  const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  return {
    publicKey,
    sign: async (bytes) => new Uint8Array(
      await crypto.subtle.sign({ name: "Ed25519" }, pair.privateKey, bytes)),
  };
}

/**
 * Mode `fledger` (0.10 dialect): answer the server's challenge with a signed Announce, list
 * nodes, and exchange PeerSetup messages with a node by its id (64 hex digits of its Ed25519
 * public key). Signing uses WebCrypto Ed25519 unless `options.signer` ({publicKey, sign}) is
 * given; browsers without Ed25519 must pass one.
 */
export class FledgerClient extends SignalingClient {
  constructor(base, options = {}) {
    super(base, options);
    this.nodeName = options.name ?? "questsig-demo";
    this.signer = options.signer ?? null;
    this.keepalive = options.keepalive ?? 60000;
    this.nodeId = this.signer ? hex(this.signer.publicKey) : null;
    this.nodes = [];
    this.setups = new Map();
    this.keepaliveTimer = null;
  }

  url() {
    return `${this.base}/`;
  }

  connect() {
    if (this.signer) return super.connect();
    return webCryptoSigner().then((signer) => {
      this.signer = signer;
      this.nodeId = hex(signer.publicKey);
      return super.connect();
    }, () => {
      this.emit("problem", {
        message: "this browser has no Ed25519 in WebCrypto: pass options.signer",
      });
      throw new Error("no Ed25519 signer");
    });
  }

  close() {
    clearInterval(this.keepaliveTimer);
    super.close();
  }

  send(message) {
    return this.sendFrame(JSON.stringify(message));
  }

  listNodes() {
    return this.send("ListIDsRequest");
  }

  opened() {
    this.setups.clear();
    clearInterval(this.keepaliveTimer);
    // any text frame keeps the node alive; the list request is what fledger nodes send
    this.keepaliveTimer = setInterval(() => this.listNodes(), this.keepalive);
  }

  lost() {
    clearInterval(this.keepaliveTimer);
  }

  received(data) {
    if (typeof data !== "string") return;
    const message = parseJson(data);
    if (!message || typeof message !== "object") return;
    if (Array.isArray(message.Challenge)) {
      this.announce(message.Challenge[1])
        .catch((error) => this.emit("problem", { message: String(error) }));
    } else if ("SystemConfig" in message) {
      if (!this.isReady) this.markReady();
    } else if (Array.isArray(message.ListIDsReply)) {
      this.nodes = message.ListIDsReply.map((entry) => entry.NodeInfoV3 ?? entry)
        .filter((info) => info && typeof info.pubkey === "string")
        .map((info) => ({ id: info.pubkey.toLowerCase(), name: info.name }));
      this.emit("nodes", { nodes: this.nodes });
      if (!this.isReady && this.nodes.some((n) => n.id === this.nodeId)) this.markReady();
    } else if (message.PeerSetup) {
      this.peerSetup(message.PeerSetup);
    } else if (typeof message.Error === "string") {
      this.emit("problem", { message: message.Error });
    }
  }

  async announce(challenge) {
    const signature = await this.signer.sign(unhex(challenge));
    this.send({
      Announce: {
        version: 3,
        challenge,
        node_info: {
          NodeInfoV3: { name: this.nodeName, client: "questsig", pubkey: this.nodeId, modules: "" },
        },
        signature: hex(signature),
      },
    });
    this.listNodes();
  }

  peerSetup({ id_init: init, id_follow: follow, message }) {
    if (typeof init !== "string" || typeof follow !== "string") return;
    const from = init.toLowerCase() === this.nodeId ? follow.toLowerCase() : init.toLowerCase();
    if (!this.setups.has(from)) {
      this.setups.set(from, { id_init: init.toLowerCase(), id_follow: follow.toLowerCase() });
    }
    let data = null;
    if (message === "Init") {
      data = { type: "hello" };
    } else if (message && typeof message.Offer === "string") {
      data = { type: "offer", sdp: message.Offer };
    } else if (message && typeof message.Answer === "string") {
      data = { type: "answer", sdp: message.Answer };
    } else if (message && typeof message.IceCandidate === "string") {
      // fledger nodes send the candidate's JSON; a bare candidate line is taken as it is
      const parsed = parseJson(message.IceCandidate);
      const candidate = parsed && typeof parsed === "object"
        ? parsed : { candidate: message.IceCandidate, sdpMid: "0" };
      data = { type: "candidate", candidate };
    }
    if (data === null) return;
    if (data.type === "hello") this.emit("peer", { id: from, initiator: true });
    else this.emit("signal", { from, data });
  }

  signal(to, data) {
    to = String(to).toLowerCase();
    // one setup keeps the roles of whoever started it
    const setup = this.setups.get(to) ?? { id_init: this.nodeId, id_follow: to };
    this.setups.set(to, setup);
    let message;
    if (data.type === "hello") message = "Init";
    else if (data.type === "offer") message = { Offer: data.sdp };
    else if (data.type === "answer") message = { Answer: data.sdp };
    else if (data.type === "candidate") message = { IceCandidate: JSON.stringify(data.candidate) };
    else return false;
    return this.send({ PeerSetup: { ...setup, message } });
  }

  /** Forget the roles of a finished setup, so the next one with `peer` starts afresh. */
  forget(peer) {
    this.setups.delete(String(peer).toLowerCase());
  }
}

// -- WebRTC --------------------------------------------------------------------------------------

/**
 * TURN credentials from a questsig `[turn]` endpoint (`GET <url>?user=NAME`), fetched when first
 * needed and again once half their lifetime has passed. `source` is the endpoint's URL or
 * `{url, user, token}`: `user` names this client in the TURN server's logs and quotas (default:
 * a random name), `token` is sent as `Authorization: Bearer` when the endpoint asks for one.
 */
export class TurnCredentials {
  constructor(source, { user = null, token = null } = {}) {
    const given = typeof source === "object" && !(source instanceof URL) ? source : { url: source };
    this.url = String(given.url);
    this.user = given.user ?? user ?? `peer-${hex(crypto.getRandomValues(new Uint8Array(6)))}`;
    this.token = given.token ?? token;
    this.pending = null;
    this.renewAt = 0;
  }

  /** Entries for RTCPeerConnection's `iceServers`. */
  async iceServers() {
    if (this.pending === null || Date.now() >= this.renewAt) {
      const pending = this.load();
      this.pending = pending;
      this.renewAt = Infinity; // one fetch at a time
      // a failed fetch is tried again by the next caller
      pending.catch(() => {
        if (this.pending === pending) this.pending = null;
      });
    }
    return this.pending;
  }

  async load() {
    const url = new URL(this.url, globalThis.location?.href);
    url.searchParams.set("user", this.user);
    const headers = this.token ? { authorization: `Bearer ${this.token}` } : {};
    const response = await fetch(url, { headers, cache: "no-store" });
    if (!response.ok) {
      throw new Error(`TURN credentials: ${response.status} ${(await response.text()).trim()}`);
    }
    const answer = await response.json();
    this.renewAt = Date.now() + answer.ttl * 500;
    // servers that give only the TURN REST API shape {username, password, uris} work too
    return answer.iceServers
      ?? [{ urls: answer.uris, username: answer.username, credential: answer.password }];
  }
}

function turnSource(given) {
  if (!given) return null;
  return given instanceof TurnCredentials ? given : new TurnCredentials(given);
}

/**
 * One RTCPeerConnection with one data channel, negotiated through a signaling client.
 * Events: open, message {data}, close, state {state}, error {message}.
 * With `turnCredentials` (a URL, `{url, user, token}` or a TurnCredentials) the connection is
 * made once the TURN credentials are in, with them added to `rtcConfig.iceServers`; `ready`
 * resolves then. Should the fetch fail, an error event says so and the link goes on without.
 */
export class PeerLink extends EventTarget {
  constructor(signaling, peer, {
    initiator = false, rtcConfig = {}, label = "questsig", turnCredentials = null,
  } = {}) {
    super();
    this.signaling = signaling;
    this.peer = peer;
    this.initiator = initiator;
    this.label = label;
    this.channel = null;
    this.closed = false;
    this.pendingCandidates = [];
    this.pc = null;
    const turn = turnSource(turnCredentials);
    if (turn) {
      this.ready = this.connectWith(rtcConfig, turn);
    } else {
      this.setUp(rtcConfig);
      this.ready = Promise.resolve();
    }
  }

  async connectWith(rtcConfig, turn) {
    let servers = [];
    try {
      servers = await turn.iceServers();
    } catch (error) {
      this.emit("error", { message: String(error.message || error) });
    }
    if (this.closed) return;
    this.setUp({ ...rtcConfig, iceServers: [...(rtcConfig.iceServers ?? []), ...servers] });
  }

  setUp(rtcConfig) {
    this.pc = new RTCPeerConnection(rtcConfig);
    this.pc.onicecandidate = (event) => {
      if (!event.candidate) return;
      this.signaling.signal(this.peer, { type: "candidate", candidate: event.candidate.toJSON() });
    };
    this.pc.onconnectionstatechange = () => this.emit("state", { state: this.pc.connectionState });
    this.pc.ondatachannel = (event) => this.attach(event.channel);
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  get open() {
    return this.channel !== null && this.channel.readyState === "open";
  }

  async start() {
    await this.ready;
    if (!this.initiator || this.closed) return;
    this.attach(this.pc.createDataChannel(this.label));
    await this.pc.setLocalDescription(await this.pc.createOffer());
    this.signaling.signal(this.peer, { type: "offer", sdp: this.pc.localDescription.sdp });
  }

  attach(channel) {
    this.channel = channel;
    channel.onopen = () => this.emit("open");
    channel.onmessage = (event) => this.emit("message", { data: event.data });
    channel.onclose = () => this.close();
  }

  async handle(data) {
    await this.ready;
    if (this.closed) return;
    if (data.type === "offer") {
      await this.pc.setRemoteDescription({ type: "offer", sdp: data.sdp });
      await this.flushCandidates();
      await this.pc.setLocalDescription(await this.pc.createAnswer());
      this.signaling.signal(this.peer, { type: "answer", sdp: this.pc.localDescription.sdp });
    } else if (data.type === "answer") {
      await this.pc.setRemoteDescription({ type: "answer", sdp: data.sdp });
      await this.flushCandidates();
    } else if (data.type === "candidate" && data.candidate) {
      // candidates may overtake the description they belong to
      if (this.pc.remoteDescription) await this.pc.addIceCandidate(data.candidate);
      else this.pendingCandidates.push(data.candidate);
    }
  }

  async flushCandidates() {
    const pending = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const candidate of pending) await this.pc.addIceCandidate(candidate);
  }

  send(data) {
    if (!this.open) return false;
    this.channel.send(data);
    return true;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.channel) this.channel.close();
    if (this.pc) this.pc.close();
    this.emit("close");
  }
}

/**
 * Wire a signaling client to PeerLinks: offers are answered, "peer" events with
 * `initiator` and "hello" requests are called, departed peers' links are closed.
 * Returns {links, call(peer)}; `onLink(link)` sees every new link before it starts.
 * `turnCredentials` (see PeerLink) is fetched once for all links and renewed as it ages.
 */
export function linkPeers(signaling, { rtcConfig = {}, turnCredentials = null, onLink = () => {} } = {}) {
  const links = new Map();
  const turn = turnSource(turnCredentials);
  const make = (peer, initiator) => {
    const old = links.get(peer);
    if (old) old.close();
    const link = new PeerLink(signaling, peer, { initiator, rtcConfig, turnCredentials: turn });
    links.set(peer, link);
    onLink(link);
    link.start().catch((error) => link.emit("error", { message: String(error) }));
    return link;
  };
  signaling.addEventListener("peer", (event) => {
    if (event.detail.initiator) make(event.detail.id, true);
  });
  signaling.addEventListener("signal", (event) => {
    const { from, data } = event.detail;
    if (data.type === "hello") {
      make(from, true);
      return;
    }
    let link = links.get(from);
    if (data.type === "offer") link = make(from, false);
    if (link) link.handle(data).catch((error) => link.emit("error", { message: String(error) }));
  });
  signaling.addEventListener("peer-left", (event) => {
    const link = links.get(event.detail.id);
    // a link that is already open no longer needs the signaling path
    if (link && !link.open) {
      link.close();
      links.delete(event.detail.id);
    }
  });
  return {
    links,
    call: (peer) => make(peer, true),
    hello: (peer) => signaling.signal(peer, { type: "hello" }),
  };
}
