// outboxd.js: a client for the outboxd broker (protocol v1, subprotocol "outboxd.v1.json").
//
// One dependency-free ES module for browsers, and for Node.js 20 or later (the global WebSocket of
// Node 22+, or `--experimental-websocket` on 20 and 21) or any runtime given a WebSocket class. What it does for the application:
//   - sends `hello` with `resume` (epoch + last processed seq) on every (re)connect;
//   - hands each message to the application once, in seq order, dropping duplicates by seq
//     within an epoch, and forgetting its seqs when the broker says the epoch changed;
//   - acks a message after the application's handler returns (or when the app calls ack());
//   - reconnects with exponential backoff, jittered and capped;
//   - answers the broker's pings, and treats a broker silent for heartbeat_ms + a grace as dead;
//   - keeps its position in localStorage (or in a store the application passes in);
//   - publishes with an idempotency key, resent across reconnects until the broker confirms;
//   - reports `missed` messages, epoch resets and errors as events.
// See README.md beside this file for the API, and docs/protocol.md for the protocol.

export const SUBPROTOCOL = "outboxd.v1.json";

const CLIENT_ID = /^[A-Za-z0-9._:@-]{1,128}$/;
const OPEN = 1; // WebSocket.OPEN

/** An error reported by the broker (an `error` frame) or by this client. `code` is stable. */
export class OutboxdError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = "OutboxdError";
    this.code = code;
    for (const [k, v] of Object.entries(details)) {
      if (v !== undefined) this[k] = v;
    }
  }
}

/** A position store kept in memory: lost when the page or process goes away. */
export function memoryStore() {
  const positions = new Map();
  return {
    load: (clientId) => positions.get(clientId) ?? null,
    save: (clientId, position) => {
      positions.set(clientId, { epoch: position.epoch, lastSeq: position.lastSeq });
    },
  };
}

/**
 * A position store in Web Storage (localStorage by default), one entry per client id under
 * `prefix + clientId`, holding `{"epoch":"...","lastSeq":N}`.
 */
export function localStorageStore({ prefix = "outboxd:position:", storage } = {}) {
  const st = () => storage ?? globalThis.localStorage;
  return {
    load(clientId) {
      const raw = st().getItem(prefix + clientId);
      if (raw == null) return null;
      try {
        return validPosition(JSON.parse(raw));
      } catch {
        return null;
      }
    },
    save(clientId, position) {
      st().setItem(prefix + clientId, JSON.stringify({ epoch: position.epoch, lastSeq: position.lastSeq }));
    },
    clear(clientId) {
      st().removeItem(prefix + clientId);
    },
  };
}

function defaultStore() {
  try {
    const ls = globalThis.localStorage;
    if (ls) {
      ls.getItem("outboxd:probe"); // throws where storage is blocked (sandboxed frames, some modes)
      return localStorageStore();
    }
  } catch {
    // fall through
  }
  return memoryStore();
}

function validPosition(p) {
  if (p && typeof p.epoch === "string" && p.epoch !== "" && Number.isSafeInteger(p.lastSeq) && p.lastSeq >= 0) {
    return { epoch: p.epoch, lastSeq: p.lastSeq };
  }
  return null;
}

function randomHex(nBytes) {
  const bytes = new Uint8Array(nBytes);
  globalThis.crypto.getRandomValues(bytes);
  let s = "";
  for (const b of bytes) s += b.toString(16).padStart(2, "0");
  return s;
}

// Keys are numbered after a random prefix drawn once per page or process: unique like random
// keys, and consecutive, so the broker stores a burst of them in one record.
const keyPrefix = randomHex(12);
let keyCounter = 0;

/**
 * A fresh idempotency key: 96 random bits in hex, "-", then a counter in 12 hex digits
 * (works outside secure contexts too).
 */
export function newKey() {
  keyCounter += 1;
  return `${keyPrefix}-${keyCounter.toString(16).padStart(12, "0")}`;
}

function toBase64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

function fromBase64(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function reportListenerError(err) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else console.error("outboxd: an event listener threw:", err);
}

const utf8 = new TextEncoder();

/** The `exp` claim (Unix seconds) of a JSON Web Token, unverified; null when there is none. */
export function tokenExpiry(token) {
  if (typeof token !== "string") return null;
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    return typeof claims?.exp === "number" && Number.isFinite(claims.exp) ? claims.exp : null;
  } catch {
    return null;
  }
}

/** Close codes after which reconnecting cannot help: the client must be fixed. */
const FATAL_CLOSE = new Map([
  [1002, "protocol error"],
  [1008, "refused by policy (client id, authorization or origin)"],
]);
const REPLACED = 4000;

/**
 * A connection to an outboxd broker that survives disconnects. See README.md.
 */
export class OutboxdClient {
  // configuration
  #url;
  #token;
  #clientId;
  #store;
  #autoAck;
  #transient; // said in hello: forget this client when a connection ends with nothing stored
  #grace;
  #connectTimeout;
  #backoff;
  #WS;
  #maxFrame;
  #random;
  #handler = null;

  // connection
  #state = "idle"; // idle | connecting | open | waiting | closed
  #ws = null;
  #welcomed = false;
  #attempt = 0; // failed attempts since the last welcome
  #handlerFailures = 0; // consecutive handler failures, to back off on a message that keeps failing
  #retryTimer = null;
  #connectTimer = null;
  #watchdog = null;
  #renewTimer = null; // when to ask the token function for the next token
  #currentToken = null; // the token this connection's hello (or last refresh) carried
  #heartbeatMs = 15000;
  #lastHeard = 0;
  #lastError = null; // the last error frame before a close, to explain the close
  #connected = null; // {promise, resolve, reject} for connect()
  #onlineListener = null;

  // position and dedup
  #positionLoaded = false;
  #position = null; // {epoch, lastSeq}: everything <= lastSeq processed (acked)
  #handed = 0; // highest seq handed to the application in this epoch
  #outstanding = []; // seqs handed and not yet acked, ascending
  #ackedAhead = new Set(); // acked out of order (manual ack), above #position.lastSeq
  #deliveryGen = 0; // bumped when handed deliveries become void (epoch reset, handler failure)
  #queue = []; // deliveries waiting for the handler
  #pumping = false;
  #connMax = 0; // highest seq seen on this connection (for gap detection)
  #welcomeNext = 1; // next_seq from the last welcome
  #saveInFlight = false; // an async store's save is running
  #saveNext = null; // the newest position to save after it

  // requests
  #refCounter = 0;
  #pending = new Map(); // ref -> {text, resolve, reject, sentOn}, in the order of the calls
  #conn = 0; // counts welcomes: which connection a request was sent on
  #maxInflight = 1024; // from the welcome: the most unanswered requests on one connection
  #inflight = 0; // requests sent on this connection and not answered yet

  #listeners = new Map();
  #stats = { connects: 0, delivered: 0, duplicates: 0, acked: 0, published: 0 };

  /**
   * @param {object} options see README.md and outboxd.d.ts
   */
  constructor(options = {}) {
    const o = options;
    if (typeof o.clientId !== "string" || !CLIENT_ID.test(o.clientId)) {
      throw new TypeError("outboxd: clientId must be 1 to 128 characters of [A-Za-z0-9._:@-]");
    }
    if (typeof o.url !== "string" && typeof o.url !== "function") {
      throw new TypeError("outboxd: url must be a string (ws://HOST:PORT/ws) or a function returning one");
    }
    this.#url = o.url;
    this.#token = o.token;
    this.#clientId = o.clientId;
    this.#store = o.store ?? defaultStore();
    if (typeof this.#store.load !== "function" || typeof this.#store.save !== "function") {
      throw new TypeError("outboxd: store must have load(clientId) and save(clientId, position)");
    }
    this.#autoAck = o.autoAck ?? true;
    this.#transient = o.transient === true;
    this.#grace = o.heartbeatGraceMs ?? 5000;
    this.#connectTimeout = o.connectTimeoutMs ?? 10000;
    const b = o.backoff ?? {};
    this.#backoff = {
      initialMs: b.initialMs ?? 250,
      maxMs: b.maxMs ?? 30000,
      multiplier: b.multiplier ?? 2,
      jitter: Math.min(1, Math.max(0, b.jitter ?? 0.5)),
    };
    this.#WS = o.WebSocket ?? globalThis.WebSocket;
    this.#maxFrame = o.maxFrameBytes ?? 131072;
    this.#random = o.random ?? Math.random;
    if (o.onMessage) this.onMessage = o.onMessage;
    for (const [name, event] of [
      ["onOpen", "open"],
      ["onDisconnect", "disconnect"],
      ["onReconnecting", "reconnecting"],
      ["onMissed", "missed"],
      ["onReset", "reset"],
      ["onError", "error"],
      ["onReplaced", "replaced"],
      ["onStateChange", "state"],
    ]) {
      if (typeof o[name] === "function") this.on(event, o[name]);
    }
  }

  /** The client id this client speaks for. */
  get clientId() {
    return this.#clientId;
  }

  /** idle | connecting | open | waiting (between attempts) | closed */
  get state() {
    return this.#state;
  }

  /** The position in force: `{epoch, lastSeq}`, or null before the first welcome. */
  get position() {
    return this.#position ? { ...this.#position } : null;
  }

  /** Counters, for monitoring and tests. */
  get stats() {
    return { ...this.#stats, pendingRequests: this.#pending.size, queued: this.#queue.length };
  }

  /** The message handler (one per client). Deliveries wait until one is set. */
  get onMessage() {
    return this.#handler;
  }

  set onMessage(fn) {
    if (fn != null && typeof fn !== "function") throw new TypeError("outboxd: onMessage must be a function");
    this.#handler = fn ?? null;
    this.#pump();
  }

  /** Adds an event listener; returns a function that removes it. */
  on(type, fn) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this.#listeners.get(type)?.delete(fn);
  }

  #emit(type, detail) {
    const set = this.#listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(detail);
      } catch (err) {
        reportListenerError(err);
      }
    }
  }

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit("state", state);
  }

  /**
   * Starts connecting (and keeps reconnecting until close()). Resolves with the first welcome;
   * rejects when the client is closed, replaced or refused before that.
   */
  connect() {
    if (this.#connected && this.#state !== "closed") return this.#connected.promise;
    let resolve, reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => {}); // a caller that does not await connect() gets the "error" event instead
    this.#connected = { promise, resolve, reject, settled: false };
    this.#attempt = 0;
    this.#setState("connecting");
    if (typeof globalThis.addEventListener === "function" && !this.#onlineListener) {
      this.#onlineListener = () => {
        if (this.#state === "waiting") {
          clearTimeout(this.#retryTimer);
          this.#retryTimer = null;
          this.#open();
        }
      };
      globalThis.addEventListener("online", this.#onlineListener);
    }
    this.#open();
    return promise;
  }

  /**
   * Closes the connection and stops reconnecting. Requests still waiting for their answer are
   * rejected with code "closed" (a publish among them may or may not have been written).
   * Deliveries not yet handed to the handler are dropped: the broker sends them again later.
   */
  close() {
    if (this.#state === "closed") return;
    this.#shutdown(new OutboxdError("closed", "the client was closed"));
  }

  #shutdown(err, event) {
    const ws = this.#ws;
    this.#teardown();
    if (ws) {
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    this.#dropQueue();
    for (const [, req] of this.#pending) req.reject(err);
    this.#pending.clear();
    if (this.#onlineListener) {
      globalThis.removeEventListener?.("online", this.#onlineListener);
      this.#onlineListener = null;
    }
    this.#setState("closed");
    if (this.#connected && !this.#connected.settled) {
      this.#connected.settled = true;
      this.#connected.reject(err);
    }
    if (event) this.#emit(event.type, event.detail);
  }

  // Forgets the deliveries the handler has not seen yet: the broker sends them again after
  // the next hello, and they are handed then. What the application holds stays outstanding.
  #dropQueue() {
    if (!this.#queue.length) return;
    const dropped = new Set(this.#queue.map((d) => d.seq));
    this.#queue = [];
    this.#outstanding = this.#outstanding.filter((s) => !dropped.has(s));
    const last = this.#outstanding.length ? this.#outstanding[this.#outstanding.length - 1] : 0;
    this.#handed = Math.max(last, this.#position ? this.#position.lastSeq : 0);
  }

  #teardown() {
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#connectTimer);
    clearTimeout(this.#watchdog);
    clearTimeout(this.#renewTimer);
    this.#retryTimer = this.#connectTimer = this.#watchdog = this.#renewTimer = null;
    const ws = this.#ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
    this.#ws = null;
    this.#welcomed = false;
  }

  async #open() {
    if (this.#state === "closed") return;
    this.#setState("connecting");
    const marker = {};
    this.#ws = marker; // claims the slot while the url, token and position are resolved
    let url, token;
    try {
      if (!this.#positionLoaded) {
        this.#position = validPosition(await this.#store.load(this.#clientId));
        this.#positionLoaded = true;
        if (this.#position) this.#handed = Math.max(this.#handed, this.#position.lastSeq);
      }
      url = typeof this.#url === "function" ? await this.#url() : this.#url;
      token = typeof this.#token === "function" ? await this.#token() : this.#token;
    } catch (err) {
      if (this.#ws !== marker) return;
      this.#ws = null;
      this.#emit("error", new OutboxdError("connect_failed", `cannot prepare the connection: ${err?.message ?? err}`, { cause: err }));
      this.#retry("prepare_failed", null);
      return;
    }
    if (this.#ws !== marker || this.#state === "closed") return;
    if (typeof this.#WS !== "function") {
      this.#ws = null;
      const e = new OutboxdError("no_websocket", "no WebSocket class here: pass options.WebSocket");
      this.#shutdown(e, { type: "error", detail: e });
      return;
    }
    let ws;
    try {
      ws = new this.#WS(url, SUBPROTOCOL);
    } catch (err) {
      this.#ws = null;
      const e = new OutboxdError("bad_url", `cannot open a WebSocket to ${url}: ${err?.message ?? err}`, { cause: err });
      this.#shutdown(e, { type: "error", detail: e });
      return;
    }
    this.#ws = ws;
    this.#currentToken = token ?? null;
    this.#lastError = null;
    this.#connectTimer = setTimeout(() => this.#drop(ws, "connect_timeout"), this.#connectTimeout);
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      const hello = { type: "hello", client_id: this.#clientId };
      if (token != null) hello.token = token;
      if (this.#transient) hello.transient = true;
      if (this.#position) hello.resume = { epoch: this.#position.epoch, last_seq: this.#position.lastSeq };
      this.#sentResume = !!hello.resume;
      this.#sendRaw(JSON.stringify(hello));
    };
    ws.onmessage = (ev) => this.#onFrame(ws, ev.data);
    ws.onclose = (ev) => this.#onClose(ws, ev);
    ws.onerror = () => {}; // a close event follows
  }

  #sentResume = false;

  /**
   * With a token function and a JWT that says when it expires: asks the function for a new
   * token a fifth of the time left before `exp` (between 1 s and 60 s before it) and hands it
   * to the broker in a `refresh` frame, so the session outlives the token.
   */
  #scheduleRenewal(ws, delayMs) {
    if (typeof this.#token !== "function") return;
    let wait = delayMs;
    if (wait === undefined) {
      const exp = tokenExpiry(this.#currentToken);
      if (exp === null) return;
      const leftS = Math.max(0, exp - Date.now() / 1000);
      const marginS = Math.min(leftS, Math.min(60, Math.max(1, leftS / 5)));
      wait = (leftS - marginS) * 1000;
    }
    clearTimeout(this.#renewTimer);
    this.#renewTimer = setTimeout(() => this.#renew(ws), wait);
  }

  async #renew(ws) {
    this.#renewTimer = null;
    let token;
    try {
      token = await this.#token();
    } catch (err) {
      token = null;
      this.#emit("error", new OutboxdError("token_failed", `the token function failed: ${err?.message ?? err}`, { cause: err }));
    }
    if (ws !== this.#ws || !this.#welcomed) return;
    if (token == null || token === this.#currentToken) {
      // Nothing new yet: ask again shortly, until the broker ends the session at expiry.
      this.#scheduleRenewal(ws, 1000);
      return;
    }
    this.#currentToken = token;
    this.#sendRaw(JSON.stringify({ type: "refresh", token }));
    this.#scheduleRenewal(ws);
  }

  /** Ends a connection the client gave up on (dead broker, no welcome in time, handler failure). */
  #drop(ws, cause) {
    if (ws !== this.#ws) return;
    this.#teardown();
    try {
      ws.close(1000, cause);
    } catch {
      // nothing to do
    }
    this.#disconnected({ code: null, reason: "", cause });
  }

  #onClose(ws, ev) {
    if (ws !== this.#ws) return;
    this.#teardown();
    const code = ev?.code ?? 1006;
    const reason = ev?.reason ?? "";
    if (code === REPLACED) {
      const err = new OutboxdError("replaced", "a newer connection with the same client id took over (close 4000)", { closeCode: code });
      this.#emit("disconnect", { code, reason, cause: "replaced", willReconnect: false });
      this.#shutdown(err, { type: "replaced", detail: { code, reason } });
      return;
    }
    if (code === 1008 && reason.startsWith("token expired") && typeof this.#token === "function") {
      // A token function can give a new one: a new hello carries it.
      this.#disconnected({ code, reason, cause: "token_expired" });
      return;
    }
    if (FATAL_CLOSE.has(code)) {
      const why = this.#lastError ? `${this.#lastError.code}: ${this.#lastError.message}` : FATAL_CLOSE.get(code);
      const err = new OutboxdError(this.#lastError?.code ?? "refused", `the broker closed the connection with ${code} (${why}); not reconnecting`, { closeCode: code });
      this.#emit("disconnect", { code, reason, cause: "refused", willReconnect: false });
      this.#shutdown(err, { type: "error", detail: err });
      return;
    }
    if (code === 1009) {
      // The broker does not say which frame was too big: the largest one sent and unanswered
      // is the suspect, and sending it again would only repeat the close.
      let largest = null;
      for (const [ref, req] of this.#pending) {
        if (req.sentOn === this.#conn && (!largest || req.text.length > largest[1].text.length)) largest = [ref, req];
      }
      if (largest) {
        this.#pending.delete(largest[0]);
        largest[1].reject(new OutboxdError("frame_too_large", `the broker closed the connection with 1009 after a ${largest[1].text.length}-character frame`));
      }
    }
    this.#disconnected({ code, reason, cause: "closed" });
  }

  #disconnected(info) {
    this.#emit("disconnect", { ...info, willReconnect: this.#state !== "closed" });
    this.#retry(info.cause, info.code);
  }

  #retry(cause) {
    if (this.#state === "closed") return;
    const n = Math.max(this.#attempt, this.#handlerFailures);
    const delay = this.#delay(n);
    this.#attempt += 1;
    this.#setState("waiting");
    this.#emit("reconnecting", { attempt: this.#attempt, delayMs: delay, cause });
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      this.#open();
    }, delay);
  }

  /** Backoff before retry number `n` (from 0): exponential, capped, with jitter downwards. */
  #delay(n) {
    const { initialMs, maxMs, multiplier, jitter } = this.#backoff;
    const base = Math.min(maxMs, initialMs * Math.pow(multiplier, Math.min(n, 64)));
    return Math.round(base * (1 - jitter * this.#random()));
  }

  #sendRaw(text) {
    const ws = this.#ws;
    if (!ws || typeof ws.send !== "function" || ws.readyState !== OPEN) return false;
    try {
      ws.send(text);
      return true;
    } catch {
      return false;
    }
  }

  #send(frame) {
    return this.#welcomed && this.#sendRaw(JSON.stringify(frame));
  }

  #onFrame(ws, data) {
    if (ws !== this.#ws) return;
    this.#lastHeard = Date.now();
    if (typeof data !== "string") return; // the broker sends text frames only
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      this.#emit("error", new OutboxdError("bad_frame_from_broker", "the broker sent a frame that is not JSON"));
      return;
    }
    if (!f || typeof f !== "object") return;
    switch (f.type) {
      case "ping":
        this.#sendRaw('{"type":"pong"}');
        return;
      case "pong":
        return;
      case "welcome":
        this.#onWelcome(ws, f);
        return;
      case "msg":
        if (this.#welcomed) this.#onMsg(f);
        return;
      case "ok":
      case "error":
        this.#onAnswer(f);
        return;
      default:
        return; // newer frame types: ignored
    }
  }

  #onWelcome(ws, f) {
    if (this.#welcomed) return;
    clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    const epoch = String(f.epoch);
    const lastSeq = Number.isSafeInteger(f.last_seq) ? f.last_seq : 0;
    const prev = this.#position;
    if (f.resumed && prev && prev.epoch === epoch) {
      // Same incarnation: what we processed since the hello stays processed.
    } else {
      // Fresh start, or the position belongs to another incarnation: forget this epoch's seqs.
      if (this.#sentResume && prev) {
        this.#emit("reset", { reason: f.reason ?? "epoch_mismatch", previous: { ...prev }, epoch, lastSeq });
      }
      this.#deliveryGen += 1;
      this.#queue = [];
      this.#outstanding = [];
      this.#ackedAhead.clear();
      this.#handed = lastSeq;
      this.#position = { epoch, lastSeq };
      this.#save();
    }
    this.#welcomed = true;
    this.#scheduleRenewal(ws);
    this.#attempt = 0;
    this.#stats.connects += 1;
    this.#connMax = lastSeq;
    this.#welcomeNext = Number.isSafeInteger(f.next_seq) ? f.next_seq : lastSeq + 1;
    this.#heartbeatMs = Number.isFinite(f.heartbeat_ms) && f.heartbeat_ms > 0 ? f.heartbeat_ms : 15000;
    this.#maxInflight = Number.isSafeInteger(f.max_inflight) && f.max_inflight > 0 ? f.max_inflight : 1024;
    this.#conn += 1;
    this.#inflight = 0;
    this.#setState("open");
    const welcome = {
      clientId: f.client_id,
      epoch,
      resumed: !!f.resumed,
      reason: f.reason,
      lastSeq,
      nextSeq: this.#welcomeNext,
      pending: f.pending ?? 0,
      missed: f.missed ?? 0,
      heartbeatMs: this.#heartbeatMs,
      maxInflight: f.max_inflight,
    };
    if (this.#connected && !this.#connected.settled) {
      this.#connected.settled = true;
      this.#connected.resolve(welcome);
    }
    this.#emit("open", welcome);
    if (welcome.missed > 0) {
      this.#emit("missed", { count: welcome.missed, epoch, source: "welcome", afterSeq: lastSeq });
    }
    // Acks made while disconnected or during the handshake: in-order ones past the resume
    // position as one upto, out-of-order ones one by one.
    if (this.#position.lastSeq > lastSeq) this.#send({ type: "ack", upto: this.#position.lastSeq });
    for (const seq of this.#ackedAhead) this.#send({ type: "ack", seq });
    // Requests not yet answered: (re)send them in their original order.
    this.#flushRequests();
    this.#armWatchdog(ws);
  }

  #armWatchdog(ws) {
    const limit = this.#heartbeatMs + this.#grace;
    const check = () => {
      if (ws !== this.#ws) return;
      const idle = Date.now() - this.#lastHeard;
      if (idle >= limit) {
        this.#drop(ws, "heartbeat_timeout");
      } else {
        this.#watchdog = setTimeout(check, limit - idle + 1);
      }
    };
    clearTimeout(this.#watchdog);
    this.#watchdog = setTimeout(check, limit);
  }

  #onMsg(f) {
    const seq = f.seq;
    if (!Number.isSafeInteger(seq) || seq < 1) {
      this.#emit("error", new OutboxdError("bad_frame_from_broker", `a msg with an invalid seq: ${seq}`));
      return;
    }
    const epoch = this.#position.epoch;
    if (seq > this.#connMax) {
      // A hole above what the welcome accounted for: retention removed messages meanwhile.
      const from = Math.max(this.#connMax + 1, this.#welcomeNext);
      if (seq - 1 >= from) {
        this.#emit("missed", { count: seq - from, epoch, source: "gap", afterSeq: from - 1, beforeSeq: seq });
      }
      this.#connMax = seq;
    }
    if (seq <= this.#handed) {
      this.#stats.duplicates += 1;
      // Already processed here: ack again so that the broker stops sending it.
      if (seq <= this.#position.lastSeq || this.#ackedAhead.has(seq)) this.#send({ type: "ack", seq });
      return;
    }
    this.#handed = seq;
    this.#outstanding.push(seq);
    this.#stats.delivered += 1;
    const gen = this.#deliveryGen;
    let acked = false;
    const delivery = {
      seq,
      epoch,
      id: f.id,
      ts: f.ts,
      from: f.from,
      topic: f.topic,
      payload: f.payload,
      bytes: typeof f.payload_b64 === "string" ? fromBase64(f.payload_b64) : undefined,
      redelivered: !!f.redelivered,
      ack: () => {
        if (acked) return;
        acked = true;
        this.#ack(seq, gen);
      },
      get acked() {
        return acked;
      },
    };
    this.#queue.push(delivery);
    this.#pump();
  }

  async #pump() {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#queue.length && this.#handler) {
        const d = this.#queue.shift();
        const gen = this.#deliveryGen;
        try {
          await this.#handler(d);
        } catch (err) {
          if (gen === this.#deliveryGen && !d.acked) this.#handlerFailed(d, err);
          continue;
        }
        if (gen !== this.#deliveryGen) continue;
        this.#handlerFailures = 0;
        if (this.#autoAck) d.ack();
      }
    } finally {
      this.#pumping = false;
    }
  }

  // The handler threw: the message is not processed. Forget what was handed after the last
  // processed seq and reconnect (with backoff), so the broker sends it again.
  #handlerFailed(d, err) {
    this.#handlerFailures += 1;
    this.#emit("error", new OutboxdError("handler_failed", `the message handler threw on seq ${d.seq}; it will be delivered again`, { seq: d.seq, cause: err }));
    this.#deliveryGen += 1;
    this.#queue = [];
    this.#outstanding = [];
    this.#ackedAhead.clear();
    this.#handed = this.#position ? this.#position.lastSeq : 0;
    if (this.#ws && this.#ws.readyState !== undefined) this.#drop(this.#ws, "handler_failed");
  }

  /** Acks a delivery by seq (for autoAck: false; same as delivery.ack()). */
  ack(deliveryOrSeq) {
    if (typeof deliveryOrSeq === "object" && deliveryOrSeq && typeof deliveryOrSeq.ack === "function") {
      deliveryOrSeq.ack();
      return;
    }
    this.#ack(deliveryOrSeq, this.#deliveryGen);
  }

  #ack(seq, gen) {
    if (gen !== this.#deliveryGen) return; // a delivery of a forgotten epoch
    if (this.#ackedAhead.has(seq)) return;
    const i = this.#outstanding.indexOf(seq);
    if (i < 0) return;
    this.#stats.acked += 1;
    if (i > 0) {
      this.#ackedAhead.add(seq);
      this.#send({ type: "ack", seq });
      return;
    }
    let upto = this.#outstanding.shift();
    while (this.#outstanding.length && this.#ackedAhead.has(this.#outstanding[0])) {
      upto = this.#outstanding.shift();
      this.#ackedAhead.delete(upto);
    }
    this.#position = { epoch: this.#position.epoch, lastSeq: upto };
    this.#save();
    this.#send({ type: "ack", upto });
  }

  // Saves the position before the ack that it covers goes out (a crash in between leaves a
  // saved position the broker has not heard of, which the next resume acks). An async store's
  // saves run one at a time, the newest position last.
  #save() {
    const pos = { ...this.#position };
    if (this.#saveInFlight) {
      this.#saveNext = pos;
      return;
    }
    this.#saveNow(pos);
  }

  #saveNow(pos) {
    let r;
    try {
      r = this.#store.save(this.#clientId, pos);
    } catch (err) {
      this.#saveFailed(err);
      return;
    }
    if (r && typeof r.then === "function") {
      this.#saveInFlight = true;
      r.then(
        () => {},
        (err) => this.#saveFailed(err),
      ).finally(() => {
        this.#saveInFlight = false;
        const next = this.#saveNext;
        this.#saveNext = null;
        if (next) this.#saveNow(next);
      });
    }
  }

  #saveFailed(err) {
    this.#emit("error", new OutboxdError("store_failed", `cannot save the position: ${err?.message ?? err}`, { cause: err }));
  }

  #onAnswer(f) {
    const req = f.ref !== undefined ? this.#pending.get(f.ref) : undefined;
    if (!req) {
      const err = new OutboxdError(f.code ?? "unknown", f.message ?? "error from the broker", { ref: f.ref });
      if (f.type === "error") {
        if (!this.#welcomed) this.#lastError = err;
        this.#emit("error", err);
      }
      return;
    }
    this.#pending.delete(f.ref);
    if (req.sentOn === this.#conn) this.#inflight -= 1;
    this.#flushRequests();
    if (f.type === "ok") req.resolve(f);
    else req.reject(new OutboxdError(f.code ?? "unknown", f.message ?? "refused by the broker", { ref: f.ref }));
  }

  #request(frame, signal) {
    if (this.#state === "closed") {
      return Promise.reject(new OutboxdError("closed", "the client is closed"));
    }
    if (signal?.aborted) return Promise.reject(signal.reason ?? new OutboxdError("aborted", "aborted"));
    const ref = `r${++this.#refCounter}`;
    frame.ref = ref;
    const text = JSON.stringify(frame);
    if (utf8.encode(text).length > this.#maxFrame) {
      return Promise.reject(new OutboxdError("frame_too_large", `the frame is over maxFrameBytes (${this.#maxFrame})`));
    }
    return new Promise((resolve, reject) => {
      const req = { text, resolve, reject, sentOn: 0 };
      if (signal) {
        const onAbort = () => {
          if (this.#pending.get(ref) === req) {
            this.#pending.delete(ref);
            if (req.sentOn === this.#conn) this.#inflight -= 1;
            this.#flushRequests();
            reject(signal.reason ?? new OutboxdError("aborted", "aborted"));
          }
        };
        signal.addEventListener("abort", onAbort, { once: true });
        req.resolve = (v) => {
          signal.removeEventListener("abort", onAbort);
          resolve(v);
        };
        req.reject = (e) => {
          signal.removeEventListener("abort", onAbort);
          reject(e);
        };
      }
      this.#pending.set(ref, req);
      this.#flushRequests();
    });
  }

  // Sends the requests not yet sent on this connection, in order, keeping at most max_inflight
  // unanswered (beyond that the broker would stop reading, acks and pongs included).
  #flushRequests() {
    if (!this.#welcomed) return;
    for (const [, req] of this.#pending) {
      if (req.sentOn === this.#conn) continue;
      if (this.#inflight >= this.#maxInflight) return;
      if (!this.#sendRaw(req.text)) return;
      req.sentOn = this.#conn;
      this.#inflight += 1;
    }
  }

  /**
   * Publishes `payload` (any JSON value, or a Uint8Array / ArrayBuffer for binary) to `to`
   * ("client:ID" or "topic:NAME"). Resolves once the broker has it durably in every recipient's
   * outbox. Until then the publish is resent, with the same idempotency key, on every
   * reconnect: the broker writes it at most once.
   */
  async publish(to, payload, options = {}) {
    if (typeof to !== "string") throw new TypeError('outboxd: publish(to, ...): "client:ID" or "topic:NAME"');
    const frame = { type: "publish", ref: null, to };
    if (payload instanceof ArrayBuffer) payload = new Uint8Array(payload);
    if (ArrayBuffer.isView(payload)) {
      frame.payload_b64 = toBase64(new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength));
    } else {
      if (payload === undefined) throw new TypeError("outboxd: publish needs a payload");
      frame.payload = payload;
    }
    frame.key = options.key ?? newKey();
    if (options.ttlMs) frame.ttl_ms = options.ttlMs;
    const ok = await this.#request(frame, options.signal);
    this.#stats.published += 1;
    return {
      id: ok.id,
      recipients: ok.recipients,
      duplicate: !!ok.duplicate,
      refused: ok.refused ?? [],
      key: frame.key,
    };
  }

  /** Subscribes durably to a topic; resolves once the subscription is on disk. */
  async subscribe(topic, options = {}) {
    await this.#request({ type: "subscribe", ref: null, topic }, options.signal);
  }

  /** Ends a durable subscription; resolves once that is on disk. */
  async unsubscribe(topic, options = {}) {
    await this.#request({ type: "unsubscribe", ref: null, topic }, options.signal);
  }
}

export default OutboxdClient;
