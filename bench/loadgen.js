// The load generator of bench/compare.py: one Node process speaking one server's protocol
// with the `ws` client, so that PeerJS and every questsig mode get the very same load.
//
//   node loadgen.js CONFIG_JSON
//
// It sets up its connections, prints {"event":"ready"}, waits for "go" on stdin, runs one
// phase and prints {"event":"done", ...}. The "connect" phase then holds its connections
// until "close" (or end of stdin). Every line it prints is one JSON object.
//
// CONFIG: kind (peerjs | hub | relay | router | sigver), base (ws:// URL of the mount; for
// router the /connect URL's prefix), phase (throughput | latency | connect), tag (makes ids
// unique across processes), pairs, size (bytes per frame), window (frames in flight per
// pair), seconds, rate (latency: frames/s), conns and concurrency (connect), ids (router:
// one registration id per pair, and ids[0] for the connect phase).
"use strict";
const WebSocket = require("ws");
const readline = require("readline");
const { performance } = require("perf_hooks");

const cfg = JSON.parse(process.argv[2]);
const TILDE = 0x7e;
const OPTS = { perMessageDeflate: false };

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

// -- per protocol: URLs, how a connection becomes ready, how a body is framed --------------

// sigver frames: Message{content(1): Content{id(1): varint, data(2): bytes}}
function varint(n) {
  const out = [];
  while (n > 0x7f) { out.push((n & 0x7f) | 0x80); n >>>= 7; }
  out.push(n);
  return out;
}
function sigverFrame(id, body) {
  const data = Buffer.from(body, "latin1");
  const inner = Buffer.concat([
    Buffer.from(id ? [0x08, ...varint(id)] : []),
    Buffer.from([0x12, ...varint(data.length)]), data]);
  return Buffer.concat([Buffer.from([0x0a, ...varint(inner.length)]), inner]);
}
// the routing id of a received content frame (0 if absent)
function sigverId(buf) {
  let i = 1;
  while (buf[i] & 0x80) i++;
  i++;
  if (buf[i] !== 0x08) return 0;
  let id = 0, shift = 0, b;
  do { b = buf[++i]; id |= (b & 0x7f) << shift; shift += 7; } while (b & 0x80);
  return id;
}

const kinds = {
  peerjs: {
    url: (name) => `${cfg.base}/peerjs?key=peerjs&id=${name}&token=t${name}`,
    readyOn: (data) => data.toString().includes('"OPEN"'),
    frame: (to, body) => '{"type":"OFFER","dst":"' + to + '","payload":"' + body + '"}',
  },
  hub: {
    url: (name) => `${cfg.base}?user=${name}`,
    readyOn: null,  // the handshake is all
    frame: (to, body) => '{"protocol":"one-to-one","endpoint":"' + to + '","data":"' + body + '"}',
  },
  relay: {
    url: (name, room) => `${cfg.base}/${room || name}`,
    readyOn: (data) => data.toString() === "/status:waiting",
    paired: (data) => data.toString() === "/status:connected",
    frame: (to, body) => body,
  },
  router: {
    url: (name, room, host) =>
      `${cfg.base}/connect?id=${room}&key=k&sock_type=${host ? "host" : "client"}`,
    readyOn: null,
    frame: (to, body) => body,
  },
  sigver: {
    url: (name, room) => `${cfg.base}/${room || name}`,
    readyOn: (data, isBinary) => isBinary && data[0] === 0x10,
    frame: (to, body) => sigverFrame(to, body),
    binary: true,
  },
};
const kind = kinds[cfg.kind];

// Opens one socket; resolves once it is ready by the protocol's rule (or on `until`).
function open(url, until) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, OPTS);
    const rule = until || kind.readyOn;
    ws.on("error", reject);
    ws.on("close", () => reject(new Error("closed before ready")));
    if (rule === null) {
      ws.once("open", () => resolve(ws));
    } else {
      const first = (data, isBinary) => {
        if (rule(data, isBinary)) { ws.off("message", first); resolve(ws); }
      };
      ws.on("message", first);
    }
  });
}

// A pair: A and B, each able to reach the other; for sigver A is the joiner (it speaks first).
async function makePair(i) {
  const a = `a${cfg.tag}x${i}`, b = `b${cfg.tag}x${i}`;
  if (cfg.kind === "relay") {
    const room = `r${cfg.tag}x${i}`;
    const wa = await open(kind.url(a, room));
    const paired = new Promise((res) => wa.on("message", (d) => kind.paired(d) && res()));
    const wb = await open(kind.url(b, room), kind.paired);
    await paired;
    return { wa, wb, toA: a, toB: b };
  }
  if (cfg.kind === "router") {
    const room = cfg.ids[i];
    const wb = await open(kind.url(b, room, true));
    const wa = await open(kind.url(a, room, false));
    return { wa, wb, toA: a, toB: b };
  }
  if (cfg.kind === "sigver") {
    const room = `g${cfg.tag}x${i}`;
    const wb = await open(kind.url(b, room));           // member: isFirst
    const wa = await open(kind.url(a, room));           // joiner: not first
    keepAlive(wa, wb);
    return { wa, wb, toA: 0, toB: 0 };
  }
  const wa = await open(kind.url(a));
  const wb = await open(kind.url(b));
  return { wa, wb, toA: a, toB: b };
}

function body(len, stamp) {
  const ts = stamp === undefined ? "000000000000"
    : String(Math.floor(stamp * 1000)).padStart(12, "0");
  return "~" + ts + "~" + "x".repeat(Math.max(0, len));
}
// padding so that the frame the client sends is cfg.size bytes
function padFor(to) {
  const overhead = Buffer.byteLength(kind.frame(to, body(0)));
  return Math.max(0, cfg.size - overhead);
}
function stampOf(data) {
  const i = data.indexOf(TILDE);
  if (i < 0) return -1;
  let v = 0;
  for (let k = i + 1; k < i + 13; k++) v = v * 10 + (data[k] - 48);
  return v / 1000;
}
// sigver closes a peer that leaves three heartbeats (20 01) unanswered with 4002: answer them
function keepAlive(...sockets) {
  if (cfg.kind !== "sigver") return;
  for (const ws of sockets) {
    ws.on("message", (data, isBinary) => {
      if (isBinary && data.length === 2 && data[0] === 0x20 && data[1] === 0x01) ws.send(data);
    });
  }
}
function send(ws, frame) {
  ws.send(frame, { binary: !!kind.binary });
}

// -- phases ------------------------------------------------------------------------------

// closed loop: A keeps `window` frames in flight to B, B echoes each one back
function closedLoop(pairs, seconds) {
  return new Promise((resolve) => {
    let count = 0, running = true, last = performance.now();
    const t0 = last;
    for (const p of pairs) {
      const fAB = kind.frame(p.toB, body(padFor(p.toB)));
      let fBA = cfg.kind === "sigver" ? null : kind.frame(p.toA, body(padFor(p.toA)));
      p.wb.removeAllListeners("message");
      p.wa.removeAllListeners("message");
      keepAlive(p.wa, p.wb);
      p.wb.on("message", (data) => {
        if (data.indexOf(TILDE) < 0) return;
        count++; last = performance.now();
        if (fBA === null) fBA = kind.frame(sigverId(data), body(padFor(sigverId(data))));
        if (running) send(p.wb, fBA);
      });
      p.wa.on("message", (data) => {
        if (data.indexOf(TILDE) < 0) return;
        count++; last = performance.now();
        if (running) send(p.wa, fAB);
      });
      for (let k = 0; k < cfg.window; k++) send(p.wa, fAB);
    }
    setTimeout(() => {
      running = false;
      let seen = -1;
      const drain = setInterval(() => {
        if (count === seen || performance.now() - t0 > seconds * 1000 + 3000) {
          clearInterval(drain);
          resolve({ count, seconds: (last - t0) / 1000 });
        }
        seen = count;
      }, 50);
    }, seconds * 1000);
  });
}

// open loop at cfg.rate frames/s, A to B round robin; one-way latency measured at B
function openLoop(pairs, seconds) {
  return new Promise((resolve) => {
    const lat = new Float64Array(Math.ceil(cfg.rate * seconds) + 16);
    let n = 0, sent = 0, next = 0;
    for (const p of pairs) {
      p.wb.removeAllListeners("message");
      keepAlive(p.wb);
      p.wb.on("message", (data) => {
        const ts = stampOf(data);
        if (ts >= 0 && n < lat.length) lat[n++] = performance.now() - ts;
      });
    }
    const pads = pairs.map((p) => padFor(p.toB));
    const t0 = performance.now();
    const total = Math.floor(cfg.rate * seconds);
    const tick = setInterval(() => {
      const due = Math.min(total, Math.floor((performance.now() - t0) * cfg.rate / 1000));
      while (sent < due) {
        const i = next; next = (next + 1) % pairs.length;
        send(pairs[i].wa, kind.frame(pairs[i].toB, body(pads[i], performance.now())));
        sent++;
      }
      if (sent >= total) {
        clearInterval(tick);
        setTimeout(() => {
          const sorted = lat.slice(0, n).sort();
          const q = (f) => (n ? sorted[Math.min(n - 1, Math.floor(n * f))] : NaN);
          let stalls = 0;
          for (let k = 0; k < n; k++) if (sorted[k] > 10) stalls++;
          resolve({ sent, received: n, p50: q(0.5), p99: q(0.99), p999: q(0.999),
                    max: n ? sorted[n - 1] : NaN, over10ms: stalls });
        }, 1000);
      }
    }, 1);
  });
}

// open cfg.conns sockets, cfg.concurrency handshakes in flight; held until "close"
async function connectMany(held) {
  const t0 = performance.now();
  let started = 0, failed = 0;
  const errors = {};
  async function worker() {
    while (started < cfg.conns) {
      const i = started++;
      const name = `i${cfg.tag}x${i}`;
      const url = cfg.kind === "router" ? kind.url(name, cfg.ids[0], false) : kind.url(name);
      try {
        const ws = await open(url);
        keepAlive(ws);
        held.push(ws);
      } catch (e) {
        failed++;
        errors[e.message] = (errors[e.message] || 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: cfg.concurrency }, worker));
  return { opened: held.length, failed, errors, seconds: (performance.now() - t0) / 1000 };
}

// -- driver -------------------------------------------------------------------------------

async function main() {
  const lines = readline.createInterface({ input: process.stdin });
  const commands = lines[Symbol.asyncIterator]();
  const next = async () => { const r = await commands.next(); return r.done ? "close" : r.value.trim(); };
  let pairs = [];
  if (cfg.phase !== "connect") {
    for (let i = 0; i < cfg.pairs; i++) pairs.push(await makePair(i));
    if (cfg.phase === "throughput") await closedLoop(pairs, 0.5);  // warm-up
  }
  emit({ event: "ready" });
  if ((await next()) !== "go") process.exit(0);
  const cpu0 = process.cpuUsage();
  let result;
  const held = [];
  if (cfg.phase === "throughput") result = await closedLoop(pairs, cfg.seconds);
  else if (cfg.phase === "latency") result = await openLoop(pairs, cfg.seconds);
  else result = await connectMany(held);
  const cpu = process.cpuUsage(cpu0);
  emit({ event: "done", cpu: (cpu.user + cpu.system) / 1e6, ...result });
  if (cfg.phase === "connect") await next();
  for (const ws of held) ws.terminate();
  for (const p of pairs) { p.wa.terminate(); p.wb.terminate(); }
  process.exit(0);
}

main().catch((e) => { emit({ event: "error", message: String(e && e.stack || e) }); process.exit(1); });
