// Unit tests of the client's protocol logic against a scripted fake WebSocket (no broker, no
// browser): resume, dedup, epoch reset, missed, acks, publish retries, heartbeat watchdog,
// backoff, fatal closes. Run: node --test test/ (from clients/js).
import { test } from "node:test";
import assert from "node:assert/strict";
import { OutboxdClient, OutboxdError, memoryStore, localStorageStore, newKey, tokenExpiry } from "../outboxd.js";

/** A WebSocket stand-in whose "broker" side the test drives by hand. */
class FakeWS {
  static all = [];
  static last() {
    return FakeWS.all[FakeWS.all.length - 1];
  }
  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.readyState = 0;
    this.sent = [];
    this.closedByClient = null;
    FakeWS.all.push(this);
  }
  send(text) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }
  // broker side
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  recv(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: true });
  }
  frames(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(cond, what, ms = 2000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

function welcome(over = {}) {
  return {
    type: "welcome", client_id: "bob", epoch: "E1", resumed: false, last_seq: 0, next_seq: 1,
    pending: 0, missed: 0, heartbeat_ms: 60000, max_inflight: 1024, ...over,
  };
}

function msg(seq, payload = { n: seq }, over = {}) {
  return { type: "msg", seq, id: `m${seq}`, ts: 1, from: "alice", payload, ...over };
}

function makeClient(opts = {}) {
  FakeWS.all = [];
  const events = [];
  const received = [];
  const client = new OutboxdClient({
    url: "ws://broker/ws",
    clientId: "bob",
    store: memoryStore(),
    WebSocket: FakeWS,
    backoff: { initialMs: 5, maxMs: 20 },
    onMessage: (d) => {
      received.push(d.seq);
    },
    ...opts,
  });
  for (const t of ["open", "disconnect", "reconnecting", "missed", "reset", "error", "replaced"]) {
    client.on(t, (e) => events.push({ t, e }));
  }
  return { client, events, received };
}

async function connected(client, w = welcome()) {
  const p = client.connect();
  await until(() => FakeWS.last(), "a socket");
  const ws = FakeWS.last();
  ws.open();
  ws.recv(w);
  await p;
  return ws;
}

async function reconnectAfter(ws, code = 1006) {
  const before = FakeWS.all.length;
  ws.serverClose(code);
  await until(() => FakeWS.all.length > before, "a new socket");
  const next = FakeWS.last();
  next.open();
  return next;
}

test("hello, delivery in order, auto-ack with upto, position saved", async () => {
  const store = memoryStore();
  const { client, received } = makeClient({ store });
  const p = client.connect();
  await until(() => FakeWS.last(), "socket");
  const ws = FakeWS.last();
  assert.equal(ws.protocol, "outboxd.v1.json");
  ws.open();
  assert.deepEqual(ws.sent[0], { type: "hello", client_id: "bob" });
  ws.recv(welcome());
  const w = await p;
  assert.equal(w.epoch, "E1");
  ws.recv(msg(1));
  ws.recv(msg(2));
  await until(() => received.length === 2, "2 deliveries");
  await until(() => ws.frames("ack").length === 2, "2 acks");
  assert.deepEqual(ws.frames("ack"), [{ type: "ack", upto: 1 }, { type: "ack", upto: 2 }]);
  await sleep(1);
  assert.deepEqual(store.load("bob"), { epoch: "E1", lastSeq: 2 });
  assert.deepEqual(client.position, { epoch: "E1", lastSeq: 2 });
  client.close();
});

test("reconnect resumes, duplicates are dropped and acked again", async () => {
  const { client, received } = makeClient();
  const ws = await connected(client);
  ws.recv(msg(1));
  ws.recv(msg(2));
  await until(() => received.length === 2, "2 deliveries");
  const ws2 = await reconnectAfter(ws);
  assert.deepEqual(ws2.sent[0], { type: "hello", client_id: "bob", resume: { epoch: "E1", last_seq: 2 } });
  ws2.recv(welcome({ resumed: true, last_seq: 2, next_seq: 4 }));
  ws2.recv(msg(2, undefined, { redelivered: true })); // e.g. an ack-timeout resend
  ws2.recv(msg(3));
  await until(() => received.length === 3, "3rd delivery");
  assert.deepEqual(received, [1, 2, 3]);
  assert.equal(client.stats.duplicates, 1);
  assert.deepEqual(ws2.frames("ack")[0], { type: "ack", seq: 2 });
  client.close();
});

test("a message still in the handler when the connection drops is not handed twice", async () => {
  let release;
  const gate = new Promise((r) => (release = r));
  const got = [];
  const { client } = makeClient({
    onMessage: async (d) => {
      got.push(d.seq);
      if (d.seq === 1) await gate;
    },
  });
  const ws = await connected(client);
  ws.recv(msg(1));
  ws.recv(msg(2));
  await until(() => got.length === 1, "first handed");
  const ws2 = await reconnectAfter(ws);
  assert.deepEqual(ws2.sent[0].resume, { epoch: "E1", last_seq: 0 });
  ws2.recv(welcome({ resumed: true, last_seq: 0, next_seq: 3, pending: 2 }));
  ws2.recv(msg(1, undefined, { redelivered: true }));
  ws2.recv(msg(2, undefined, { redelivered: true }));
  release();
  await until(() => got.length === 2, "second handed");
  await until(() => ws2.frames("ack").length >= 1, "acks on the new connection");
  assert.deepEqual(got, [1, 2]);
  assert.deepEqual(ws2.frames("ack").at(-1), { type: "ack", upto: 2 });
  client.close();
});

test("an ack made during the handshake is sent right after the welcome", async () => {
  let release;
  const gate = new Promise((r) => (release = r));
  const { client } = makeClient({ onMessage: (d) => (d.seq === 1 ? gate : undefined) });
  const ws = await connected(client);
  ws.recv(msg(1));
  const before = FakeWS.all.length;
  ws.serverClose(1006);
  await until(() => FakeWS.all.length > before, "a new socket");
  const ws2 = FakeWS.last();
  ws2.open(); // hello says last_seq 0: seq 1 is still in the handler
  assert.equal(ws2.sent[0].resume.last_seq, 0);
  release();
  await until(() => client.position.lastSeq === 1, "seq 1 processed");
  assert.equal(ws2.frames("ack").length, 0, "no ack before the welcome");
  ws2.recv(welcome({ resumed: true, last_seq: 0, next_seq: 2, pending: 1 }));
  assert.deepEqual(ws2.frames("ack"), [{ type: "ack", upto: 1 }]);
  client.close();
});

test("resumed:false with epoch_mismatch resets dedup and reports it", async () => {
  const store = memoryStore();
  store.save("bob", { epoch: "OLD", lastSeq: 7 });
  const { client, events, received } = makeClient({ store });
  const p = client.connect();
  await until(() => FakeWS.last(), "socket");
  const ws = FakeWS.last();
  ws.open();
  assert.deepEqual(ws.sent[0].resume, { epoch: "OLD", last_seq: 7 });
  ws.recv(welcome({ epoch: "NEW", reason: "epoch_mismatch", next_seq: 3, pending: 2 }));
  await p;
  ws.recv(msg(1));
  ws.recv(msg(2));
  await until(() => received.length === 2, "deliveries from seq 1");
  const reset = events.find((x) => x.t === "reset").e;
  assert.equal(reset.reason, "epoch_mismatch");
  assert.deepEqual(reset.previous, { epoch: "OLD", lastSeq: 7 });
  assert.equal(reset.epoch, "NEW");
  await sleep(1);
  assert.deepEqual(store.load("bob"), { epoch: "NEW", lastSeq: 2 });
  client.close();
});

test("missed is reported from welcome and from a gap above next_seq", async () => {
  const { client, events, received } = makeClient();
  const ws = await connected(client, welcome({ last_seq: 3, next_seq: 10, missed: 2 }));
  ws.recv(msg(5)); // 4 and 6..9 are accounted for by welcome.missed (or were acked)
  ws.recv(msg(9));
  ws.recv(msg(10));
  ws.recv(msg(13)); // 11 and 12 vanished while connected
  await until(() => received.length === 4, "deliveries");
  const missed = events.filter((x) => x.t === "missed").map((x) => x.e);
  assert.deepEqual(missed, [
    { count: 2, epoch: "E1", source: "welcome", afterSeq: 3 },
    { count: 2, epoch: "E1", source: "gap", afterSeq: 10, beforeSeq: 13 },
  ]);
  client.close();
});

test("manual ack: out of order acks by seq, the watermark moves with upto", async () => {
  const held = [];
  const { client } = makeClient({ autoAck: false, onMessage: (d) => held.push(d) });
  const ws = await connected(client);
  ws.recv(msg(1));
  ws.recv(msg(2));
  ws.recv(msg(3));
  await until(() => held.length === 3, "3 held");
  assert.equal(ws.frames("ack").length, 0);
  held[1].ack();
  held[1].ack(); // twice: no second frame
  held[0].ack();
  assert.deepEqual(ws.frames("ack"), [{ type: "ack", seq: 2 }, { type: "ack", upto: 2 }]);
  assert.deepEqual(client.position, { epoch: "E1", lastSeq: 2 });
  client.ack(3);
  assert.deepEqual(ws.frames("ack").at(-1), { type: "ack", upto: 3 });
  client.close();
});

test("newKey: keys are distinct, share one prefix and sort in the order they were made", () => {
  const keys = Array.from({ length: 300 }, () => newKey());
  assert.equal(new Set(keys).size, keys.length);
  assert.deepEqual([...keys].sort(), keys);
  assert.ok(keys.every((k) => k.slice(0, 24) === keys[0].slice(0, 24)));
});

test("publish: generated key, resent with the same key after a reconnect, resolves on ok", async () => {
  const { client } = makeClient();
  const ws = await connected(client);
  const p = client.publish("client:alice", { text: "hi" });
  const [f] = ws.frames("publish");
  assert.match(f.key, /^[0-9a-f]{24}-[0-9a-f]{12}$/);
  assert.equal(f.to, "client:alice");
  assert.deepEqual(f.payload, { text: "hi" });
  const ws2 = await reconnectAfter(ws);
  assert.equal(ws2.frames("publish").length, 0, "not before the welcome");
  ws2.recv(welcome({ resumed: true }));
  const [f2] = ws2.frames("publish");
  assert.deepEqual(f2, f);
  ws2.recv({ type: "ok", ref: f.ref, id: "1a", recipients: 1, duplicate: true });
  const r = await p;
  assert.deepEqual(r, { id: "1a", recipients: 1, duplicate: true, refused: [], key: f.key });

  const bad = client.publish("client:nobody", 1, { key: "k1", ttlMs: 5 });
  const fb = ws2.frames("publish").at(-1);
  assert.equal(fb.key, "k1");
  assert.equal(fb.ttl_ms, 5);
  ws2.recv({ type: "error", ref: fb.ref, code: "outbox_full", message: "full" });
  await assert.rejects(bad, (e) => e instanceof OutboxdError && e.code === "outbox_full");

  const bin = client.publish("topic:t", new Uint8Array([0, 255, 1]));
  assert.equal(ws2.frames("publish").at(-1).payload_b64, "AP8B");
  ws2.recv({ type: "ok", ref: ws2.frames("publish").at(-1).ref, id: "2", recipients: 0 });
  await bin;

  await assert.rejects(client.publish("client:x", "x".repeat(200000)), (e) => e.code === "frame_too_large");
  client.close();
});

test("publish while disconnected waits for the welcome; close rejects what is pending", async () => {
  const { client } = makeClient();
  const ws = await connected(client);
  ws.serverClose(1001);
  const p = client.publish("client:alice", 1);
  await until(() => FakeWS.all.length === 2, "reconnect");
  FakeWS.last().open();
  assert.equal(FakeWS.last().frames("publish").length, 0);
  client.close();
  await assert.rejects(p, (e) => e.code === "closed");
  assert.equal(client.state, "closed");
});

test("no more than max_inflight requests wait for an answer on one connection", async () => {
  const { client } = makeClient();
  const ws = await connected(client, welcome({ max_inflight: 2 }));
  const ps = [1, 2, 3, 4].map((n) => client.publish("client:alice", n));
  assert.deepEqual(ws.frames("publish").map((f) => f.payload), [1, 2]);
  ws.recv({ type: "ok", ref: ws.frames("publish")[0].ref, id: "a", recipients: 1 });
  assert.deepEqual(ws.frames("publish").map((f) => f.payload), [1, 2, 3]);
  // After a reconnect the unanswered ones go again, in order, within the window.
  const ws2 = await reconnectAfter(ws);
  ws2.recv(welcome({ resumed: true, max_inflight: 2 }));
  assert.deepEqual(ws2.frames("publish").map((f) => f.payload), [2, 3]);
  for (const f of ws2.frames("publish")) ws2.recv({ type: "ok", ref: f.ref, id: "b", recipients: 1 });
  assert.deepEqual(ws2.frames("publish").map((f) => f.payload), [2, 3, 4]);
  ws2.recv({ type: "ok", ref: ws2.frames("publish")[2].ref, id: "c", recipients: 1 });
  await Promise.all(ps);
  client.close();
});

test("close 1009: the largest unanswered frame is refused, the others go again", async () => {
  const { client } = makeClient();
  const ws = await connected(client);
  const small = client.publish("client:alice", "s");
  const big = assert.rejects(client.publish("client:alice", "b".repeat(5000)), (e) => e.code === "frame_too_large");
  const ws2 = await reconnectAfter(ws, 1009);
  await big;
  ws2.recv(welcome({ resumed: true }));
  assert.deepEqual(ws2.frames("publish").map((f) => f.payload), ["s"]);
  ws2.recv({ type: "ok", ref: ws2.frames("publish")[0].ref, id: "a", recipients: 1 });
  await small;
  client.close();
});

test("an async store: saves run one at a time and the newest position is saved last", async () => {
  const saved = [];
  let inFlight = 0;
  const store = {
    load: async () => null,
    save: async (_id, pos) => {
      inFlight += 1;
      assert.equal(inFlight, 1, "one save at a time");
      await sleep(5);
      saved.push(pos.lastSeq);
      inFlight -= 1;
    },
  };
  const { client, received } = makeClient({ store });
  const ws = await connected(client);
  for (let seq = 1; seq <= 5; seq++) ws.recv(msg(seq));
  await until(() => received.length === 5, "deliveries");
  await until(() => saved.at(-1) === 5, "the last position saved");
  assert.ok(saved.length < 7, `coalesced: ${saved}`);
  client.close();
});

test("binary payloads arrive as bytes", async () => {
  const got = [];
  const { client } = makeClient({ onMessage: (d) => got.push(d) });
  const ws = await connected(client);
  ws.recv({ type: "msg", seq: 1, id: "x", ts: 1, payload_b64: "AP8B" });
  await until(() => got.length === 1, "delivery");
  assert.deepEqual([...got[0].bytes], [0, 255, 1]);
  assert.equal(got[0].payload, undefined);
  client.close();
});

test("pings are answered; a silent broker is detected and the client reconnects", async () => {
  const { client, events } = makeClient({ heartbeatGraceMs: 40 });
  const ws = await connected(client, welcome({ heartbeat_ms: 40 }));
  ws.recv({ type: "ping" });
  assert.deepEqual(ws.sent.at(-1), { type: "pong" });
  const t0 = Date.now();
  await until(() => FakeWS.all.length === 2, "a reconnect", 2000);
  const elapsed = Date.now() - t0;
  assert.ok(elapsed >= 75, `detected after ${elapsed} ms, not before heartbeat + grace`);
  const d = events.find((x) => x.t === "disconnect").e;
  assert.equal(d.cause, "heartbeat_timeout");
  assert.ok(ws.closedByClient);
  client.close();
});

test("no welcome in time: connect timeout, then backoff grows to its cap", async () => {
  const { client, events } = makeClient({
    connectTimeoutMs: 10,
    random: () => 0,
    backoff: { initialMs: 5, maxMs: 20, multiplier: 2 },
  });
  client.connect();
  await until(() => events.filter((x) => x.t === "reconnecting").length >= 4, "4 retries");
  client.close();
  const delays = events.filter((x) => x.t === "reconnecting").map((x) => x.e.delayMs);
  assert.deepEqual(delays.slice(0, 4), [5, 10, 20, 20]);
  assert.equal(events.find((x) => x.t === "disconnect").e.cause, "connect_timeout");
});

test("jitter keeps delays between (1 - jitter) * base and base", async () => {
  const { client, events } = makeClient({
    connectTimeoutMs: 5,
    random: () => 0.999,
    backoff: { initialMs: 8, maxMs: 8, jitter: 0.5 },
  });
  client.connect();
  await until(() => events.filter((x) => x.t === "reconnecting").length >= 2, "retries");
  client.close();
  for (const x of events.filter((x) => x.t === "reconnecting")) {
    assert.ok(x.e.delayMs >= 4 && x.e.delayMs <= 8, `delay ${x.e.delayMs}`);
  }
});

test("a handler that throws: error event, redelivered on the next connection", async () => {
  let fail = true;
  const got = [];
  const { client, events } = makeClient({
    onMessage: (d) => {
      got.push(d.seq);
      if (d.seq === 2 && fail) {
        fail = false;
        throw new Error("boom");
      }
    },
  });
  const ws = await connected(client);
  ws.recv(msg(1));
  ws.recv(msg(2));
  ws.recv(msg(3));
  await until(() => FakeWS.all.length === 2, "reconnect after the failure");
  const err = events.find((x) => x.t === "error").e;
  assert.equal(err.code, "handler_failed");
  assert.equal(err.seq, 2);
  const ws2 = FakeWS.last();
  ws2.open();
  assert.deepEqual(ws2.sent[0].resume, { epoch: "E1", last_seq: 1 });
  ws2.recv(welcome({ resumed: true, last_seq: 1, next_seq: 4 }));
  ws2.recv(msg(2));
  ws2.recv(msg(3));
  await until(() => got.length === 4, "redelivery");
  assert.deepEqual(got, [1, 2, 2, 3]);
  client.close();
});

test("replaced (4000): no reconnect; refused (1008): error, connect() rejects", async () => {
  const a = makeClient();
  const ws = await connected(a.client);
  ws.serverClose(4000);
  await sleep(30);
  assert.equal(FakeWS.all.length, 1);
  assert.equal(a.client.state, "closed");
  assert.ok(a.events.some((x) => x.t === "replaced"));

  const b = makeClient();
  const p = b.client.connect();
  await until(() => FakeWS.last(), "socket");
  const ws2 = FakeWS.last();
  ws2.open();
  ws2.recv({ type: "error", code: "bad_client_id", message: "no" });
  ws2.serverClose(1008);
  await assert.rejects(p, (e) => e.code === "bad_client_id");
  assert.equal(b.client.state, "closed");
  await sleep(30);
  assert.equal(FakeWS.all.length, 1);
});

/** An unsigned JWT-shaped token that expires `inS` seconds from now (the client never checks signatures). */
function jwt(inS, n) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256" })}.${b64({ sub: "bob", exp: Date.now() / 1000 + inS, n })}.sig`;
}

test("tokenExpiry reads a JWT's exp and nothing else", () => {
  assert.equal(tokenExpiry(`x.${Buffer.from('{"exp":1700000000}').toString("base64url")}.y`), 1700000000);
  assert.equal(tokenExpiry(`x.${Buffer.from('{"sub":"bob"}').toString("base64url")}.y`), null);
  assert.equal(tokenExpiry("opaque-api-key"), null);
  assert.equal(tokenExpiry("a.!!!.c"), null);
  assert.equal(tokenExpiry(undefined), null);
});

test("a token function renews the token with refresh before it expires; an expiry close reconnects", async () => {
  let n = 0;
  const a = makeClient({ token: () => jwt(2, ++n) });
  const ws = await connected(a.client);
  assert.equal(ws.frames("hello")[0].token.length > 0, true);
  // 2 s left: the new token is asked for and sent 1 s before the expiry, on the same socket.
  await until(() => ws.frames("refresh").length === 1, "a refresh", 3000);
  const refresh = ws.frames("refresh")[0];
  assert.notEqual(refresh.token, ws.frames("hello")[0].token);
  assert.equal(FakeWS.all.length, 1, "no reconnect for a refresh");
  // Closed at expiry anyway (say the refresh was refused): reconnect with a fresh token.
  const next = await reconnectAfterClose(ws, 1008, "token expired: send a refresh frame");
  assert.ok(next.frames("hello")[0].token !== refresh.token);
  assert.equal(a.client.state === "closed", false);
  await a.client.close();

  // A fixed token: the same close ends the client.
  const b = makeClient({ token: jwt(60, 0) });
  const ws2 = await connected(b.client);
  ws2.serverClose(1008, "token expired: send a refresh frame");
  await sleep(30);
  assert.equal(b.client.state, "closed");
  assert.equal(FakeWS.all.length, 1);
});

async function reconnectAfterClose(ws, code, reason) {
  const before = FakeWS.all.length;
  ws.serverClose(code, reason);
  await until(() => FakeWS.all.length > before, "a new socket");
  const next = FakeWS.last();
  next.open();
  return next;
}

test("options are checked", () => {
  assert.throws(() => new OutboxdClient({ url: "ws://x/ws", clientId: "bad id" }), TypeError);
  assert.throws(() => new OutboxdClient({ url: "ws://x/ws", clientId: "" }), TypeError);
  assert.throws(() => new OutboxdClient({ clientId: "ok" }), TypeError);
  assert.throws(() => new OutboxdClient({ url: "ws://x/ws", clientId: "ok", store: {} }), TypeError);
});

test("localStorageStore keeps one entry per client and ignores garbage", () => {
  const m = new Map();
  const storage = {
    getItem: (k) => (m.has(k) ? m.get(k) : null),
    setItem: (k, v) => m.set(k, String(v)),
    removeItem: (k) => m.delete(k),
  };
  const s = localStorageStore({ storage });
  assert.equal(s.load("bob"), null);
  s.save("bob", { epoch: "E", lastSeq: 4 });
  assert.equal(m.get("outboxd:position:bob"), '{"epoch":"E","lastSeq":4}');
  assert.deepEqual(s.load("bob"), { epoch: "E", lastSeq: 4 });
  m.set("outboxd:position:bob", "{not json");
  assert.equal(s.load("bob"), null);
  m.set("outboxd:position:bob", '{"epoch":"E","lastSeq":-1}');
  assert.equal(s.load("bob"), null);
});

test("transient is said in hello only when asked for", async () => {
  const { client } = makeClient({ transient: true });
  const p = client.connect();
  await until(() => FakeWS.last(), "a socket");
  const ws = FakeWS.last();
  ws.open();
  assert.deepEqual(ws.sent[0], { type: "hello", client_id: "bob", transient: true });
  ws.recv(welcome());
  await p;
  client.close();
});
