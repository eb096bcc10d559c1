// The JavaScript client in a real headless browser (Debian's chromium, driven by playwright-core)
// against the real broker binary: receive and ack, resume from localStorage after a reload,
// broker SIGKILL and restart without duplicates or losses, publishes cut by a crash retried with
// their key and written once, a silent broker (SIGSTOP) detected by the heartbeat watchdog,
// `missed` after TTL expiry, an epoch reset after a lost data directory, and the demo page.
//
// Run from clients/js: `npm ci && node --test test/` (see README.md). Environment:
//   OUTBOXD_BIN     broker binary to use (default: `cargo build` it, then target/debug/outboxd)
//   CHROMIUM_PATH   browser binary (default: /usr/bin/chromium)
//   OUTBOXD_TEST_LOG=1  copy the broker's log to stderr
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const jsRoot = resolve(here, "..");
const repoRoot = resolve(jsRoot, "..", "..");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Broker settings for the whole run: pings every 200 ms, a silent client is dropped after 1 s.
const BROKER_ENV = {
  OUTBOXD_HEARTBEAT__INTERVAL_MS: "200",
  OUTBOXD_HEARTBEAT__TIMEOUT_MS: "1000",
  OUTBOXD_SERVER__ADMIN_LISTEN: "127.0.0.1:0",
};
const HEARTBEAT_MS = 200;
const GRACE_MS = 400;
// Client settings: give up on a silent broker after 200 + 400 ms, on a connect after 1 s, and
// retry every 100 ms growing to 500 ms at most.
const FAST = { heartbeatGraceMs: GRACE_MS, connectTimeoutMs: 1000, backoff: { initialMs: 100, maxMs: 500 } };

function brokerBinary() {
  if (process.env.OUTBOXD_BIN) return resolve(process.env.OUTBOXD_BIN);
  const r = spawnSync("cargo", ["build", "--bin", "outboxd"], { cwd: repoRoot, stdio: ["ignore", "inherit", "inherit"] });
  if (r.status !== 0) throw new Error(`cargo build --bin outboxd failed (exit ${r.status}, ${r.error ?? ""})`);
  const target = process.env.CARGO_TARGET_DIR ? resolve(repoRoot, process.env.CARGO_TARGET_DIR) : join(repoRoot, "target");
  return join(target, "debug", "outboxd");
}

function chromiumPath() {
  const candidates = [process.env.CHROMIUM_PATH, "/usr/bin/chromium", "/usr/bin/chromium-browser"].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new Error(`no chromium found (tried ${candidates.join(", ")}): apt-get install chromium, or set CHROMIUM_PATH`);
  }
  return found;
}

const tempDirs = [];
function tempDir(label) {
  const d = mkdtempSync(join(tmpdir(), `outboxd-js-${label}-`));
  tempDirs.push(d);
  return d;
}

const brokers = new Set();

/** The real broker binary, started on 127.0.0.1 with a data directory of its own. */
class Broker {
  constructor(bin, dataDir) {
    this.bin = bin;
    this.dataDir = dataDir;
    this.proc = null;
    this.port = 0;
    this.url = null;
    this.log = [];
  }

  /** Starts it (on the port it had before, if any) and waits for `outboxd ready: ws://...`. */
  async start() {
    const listen = `127.0.0.1:${this.port}`;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#spawn(listen);
      } catch (err) {
        // A port just freed by a killed broker can take a moment to be bindable again.
        if (this.port === 0 || attempt >= 20) throw err;
        await sleep(100);
      }
    }
  }

  async #spawn(listen) {
    const proc = spawn(this.bin, ["serve", "--listen", listen, "--data", this.dataDir], {
      cwd: this.dataDir, // so that no ./config.toml is picked up
      env: { ...process.env, ...BROKER_ENV },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.proc = proc;
    brokers.add(this);
    proc.exited = once(proc, "exit");
    const lines = createInterface({ input: proc.stderr });
    lines.on("line", (l) => {
      this.log.push(l);
      if (this.log.length > 300) this.log.shift();
      if (process.env.OUTBOXD_TEST_LOG) process.stderr.write(`[broker ${proc.pid}] ${l}\n`);
    });
    const stdout = createInterface({ input: proc.stdout });
    const ready = new Promise((resolveReady, rejectReady) => {
      const timer = setTimeout(() => rejectReady(new Error(`no ready line from the broker within 20 s\n${this.tail()}`)), 20000);
      stdout.on("line", (line) => {
        // Other lines (such as `outboxd admin: http://...`) may come first.
        const m = /^outboxd ready: (ws:\/\/\S+)$/.exec(line.trim());
        if (m) {
          clearTimeout(timer);
          resolveReady(m[1]);
        }
      });
      proc.on("exit", (code, signal) => {
        clearTimeout(timer);
        rejectReady(new Error(`the broker exited (code ${code}, signal ${signal}) before it was ready\n${this.tail()}`));
      });
    });
    this.url = await ready;
    this.port = Number(new URL(this.url).port);
    return this.url;
  }

  tail(n = 30) {
    return this.log.slice(-n).join("\n");
  }

  get running() {
    return this.proc && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  signal(sig) {
    process.kill(this.proc.pid, sig);
  }

  /** kill -9, as a crash would. */
  async kill() {
    if (!this.running) return;
    this.signal("SIGKILL");
    await this.proc.exited;
  }

  async restart() {
    await this.kill();
    return this.start();
  }

  async shutdown() {
    if (!this.running) return;
    try {
      this.signal("SIGCONT");
      this.signal("SIGTERM");
    } catch {
      return;
    }
    const t = setTimeout(() => this.running && this.signal("SIGKILL"), 5000);
    await this.proc.exited;
    clearTimeout(t);
  }
}

process.on("exit", () => {
  for (const b of brokers) {
    if (b.running) {
      try {
        process.kill(b.proc.pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  }
});

const MIME = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8" };

/** Serves clients/js (the module, the harness page and the demo) on 127.0.0.1. */
async function staticServer() {
  const server = createServer((req, res) => {
    let path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    if (path.endsWith("/")) path += "index.html";
    const file = normalize(join(jsRoot, path));
    const type = MIME[extname(file)];
    if (!file.startsWith(jsRoot + sep) || file.includes(`${sep}node_modules${sep}`) || !type || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
      return;
    }
    res.writeHead(200, { "content-type": type, "cache-control": "no-store" }).end(readFileSync(file));
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return server;
}

let bin, broker, server, base, browser;
const contexts = [];

async function harness() {
  const ctx = await browser.newContext();
  contexts.push(ctx);
  const page = await ctx.newPage();
  page.on("pageerror", (e) => process.stderr.write(`[page error] ${e.stack ?? e}\n`));
  await page.goto(`${base}/test/harness.html`);
  await page.waitForFunction(() => window.obxReady === true);
  return page;
}

const start = (page, name, opts) => page.evaluate(([n, o]) => window.obx.start(n, o), [name, opts]);
const snapshot = (page, name) => page.evaluate((n) => window.obx.snapshot(n), name);
const publish = (page, name, to, payload, opts) => page.evaluate(([n, t, p, o]) => window.obx.publish(n, t, p, o), [name, to, payload, opts]);
const publishMany = (page, name, to, payloads, keyPrefix) =>
  page.evaluate(([n, t, p, k]) => window.obx.publishMany(n, t, p, k), [name, to, payloads, keyPrefix]);

function brief(snap) {
  if (!snap) return "no snapshot";
  return JSON.stringify({
    state: snap.state,
    stats: snap.stats,
    position: snap.position,
    received: snap.received.map((r) => r.seq),
    events: snap.events.slice(-8),
  });
}

/** Polls a client's snapshot until `cond` holds. */
async function waitSnap(page, name, cond, what, timeoutMs = 20000) {
  const end = Date.now() + timeoutMs;
  let snap;
  for (;;) {
    snap = await snapshot(page, name);
    if (cond(snap)) return snap;
    if (Date.now() > end) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}\nclient ${name}: ${brief(snap)}\nbroker log:\n${broker.tail()}`);
    }
    await sleep(25);
  }
}

const events = (snap, type) => snap.events.filter((e) => e.type === type);
const range = (n, from = 0) => Array.from({ length: n }, (_, i) => i + from);

function assertStrictlyIncreasing(seqs) {
  for (let i = 1; i < seqs.length; i++) {
    assert.ok(seqs[i] > seqs[i - 1], `seqs not strictly increasing at ${i}: ${seqs.join(",")}`);
  }
}

describe("JavaScript client in headless chromium against the real broker", () => {
  let tx, rx;

  before(async () => {
    bin = brokerBinary();
    assert.ok(existsSync(bin), `no broker binary at ${bin}`);
    broker = new Broker(bin, tempDir("data"));
    await broker.start();
    server = await staticServer();
    base = `http://127.0.0.1:${server.address().port}`;
    browser = await chromium.launch({
      executablePath: chromiumPath(),
      headless: true,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    tx = await harness(); // publishers
    rx = await harness(); // receivers
    await start(tx, "alice", { url: broker.url, clientId: "alice", store: "memory", ...FAST });
  });

  after(async () => {
    for (const ctx of contexts) await ctx.close().catch(() => {});
    await browser?.close().catch(() => {});
    server?.close();
    for (const b of brokers) await b.shutdown().catch(() => {});
    for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
  });

  test("receives messages in order, acks them, keeps the position in localStorage", async () => {
    const w = await start(rx, "bob", { url: broker.url, clientId: "bob", ...FAST });
    assert.equal(w.resumed, false);
    for (const n of range(5)) {
      const r = await publish(tx, "alice", "client:bob", { n });
      assert.equal(r.recipients, 1, JSON.stringify(r));
      assert.equal(r.duplicate, false);
    }
    const snap = await waitSnap(rx, "bob", (s) => s.received.length >= 5 && s.position?.lastSeq === 5, "5 messages acked");
    assert.deepEqual(snap.received.map((r) => r.payload.n), range(5));
    assert.deepEqual(snap.received.map((r) => r.seq), range(5, 1));
    assert.ok(snap.received.every((r) => r.from === "alice" && r.epoch === w.epoch));
    const stored = await rx.evaluate(() => localStorage.getItem("outboxd:position:bob"));
    assert.deepEqual(JSON.parse(stored), { epoch: w.epoch, lastSeq: 5 });
    await rx.evaluate(() => window.obx.close("bob"));
    // The acks reached the broker: a bare hello finds nothing pending.
    const raw = await rx.evaluate(([u, id]) => window.obx.rawWelcome(u, id), [broker.url, "bob"]);
    assert.equal(raw.pending, 0, JSON.stringify(raw));
    assert.equal(raw.last_seq, 5);
  });

  test("after a page reload the client resumes from localStorage and gets exactly the gap", async () => {
    await rx.reload();
    await rx.waitForFunction(() => window.obxReady === true);
    await publish(tx, "alice", "client:bob", { n: 5 });
    const w = await start(rx, "bob", { url: broker.url, clientId: "bob", ...FAST });
    assert.equal(w.resumed, true);
    assert.equal(w.lastSeq, 5);
    assert.equal(w.pending, 1);
    const snap = await waitSnap(rx, "bob", (s) => s.received.length >= 1 && s.position?.lastSeq === 6, "the gap");
    await sleep(200);
    const later = await snapshot(rx, "bob");
    assert.deepEqual(later.received.map((r) => [r.seq, r.payload.n]), [[6, 5]]);
    assert.equal(snap.stats.duplicates, 0);
    await rx.evaluate(() => window.obx.close("bob"));
  });

  test("broker SIGKILL and restart: resume without duplicates or losses", async (t) => {
    const first = range(40).map((n) => ({ n }));
    await publishMany(tx, "alice", "client:carol", first, "carol-a");
    await waitSnap(tx, "alice", (s) => s.publishes.length >= 40, "40 publishes confirmed");
    // The handler stops after 8 messages: the kill comes while 32 messages are handed to the
    // client but not processed, so the broker sends them again after the restart.
    await start(rx, "carol", { url: broker.url, clientId: "carol", holdAfter: 8, ...FAST });
    await waitSnap(rx, "carol", (s) => s.received.length >= 8 && s.position?.lastSeq === 8, "8 messages processed");
    await broker.kill();
    // Published while the broker is down: queued by the client, sent after its reconnect.
    await publishMany(tx, "alice", "client:carol", range(10, 40).map((n) => ({ n })), "carol-b");
    await sleep(300);
    await broker.start();
    await waitSnap(rx, "carol", (s) => events(s, "open").length >= 2 && s.stats.duplicates >= 32, "the resend of 32 messages");
    await rx.evaluate(() => window.obx.release("carol"));
    const snap = await waitSnap(rx, "carol", (s) => s.received.length >= 50 && s.position?.lastSeq === 50, "50 messages");
    const pubs = await waitSnap(tx, "alice", (s) => s.publishes.length >= 50, "50 publishes confirmed");
    assert.deepEqual(pubs.publishes.filter((p) => p.error), []);
    await sleep(300);
    const final = await snapshot(rx, "carol");
    assert.deepEqual(final.received.map((r) => r.payload.n), range(50), "every message once, in order");
    assertStrictlyIncreasing(final.received.map((r) => r.seq));
    const opens = events(final, "open");
    assert.ok(opens.length >= 2, "reconnected");
    assert.equal(opens.at(-1).resumed, true);
    assert.ok(final.stats.duplicates > 0, "the broker resent messages the client had already: dropped by seq");
    t.diagnostic(`carol: ${opens.length} welcomes, ${final.stats.duplicates} duplicates dropped by seq`);
    assert.equal(snap.received.length, 50);
    await rx.evaluate(() => window.obx.close("carol"));
  });

  test("publishes cut by a broker crash are retried with their key and written once", async (t) => {
    const payloads = range(30).map((n) => ({ n }));
    await publishMany(tx, "alice", "client:dave", payloads, "dave");
    await broker.kill(); // some publishes are written, some not, some written without their ok
    await sleep(200);
    await broker.start();
    const pubs = await waitSnap(tx, "alice", (s) => s.publishes.filter((p) => p.key?.startsWith("dave-")).length >= 30, "30 publishes confirmed");
    const mine = pubs.publishes.filter((p) => p.key?.startsWith("dave-"));
    assert.deepEqual(mine.filter((p) => p.error), []);
    // The same key twice: the second is answered from the dedup record, nothing new is written.
    const a = await publish(tx, "alice", "client:dave", { n: "same" }, { key: "dave-same" });
    const b = await publish(tx, "alice", "client:dave", { n: "same" }, { key: "dave-same" });
    assert.equal(a.duplicate, false);
    assert.equal(b.duplicate, true);
    assert.equal(b.id, a.id);

    await start(rx, "dave", { url: broker.url, clientId: "dave", ...FAST });
    await waitSnap(rx, "dave", (s) => s.received.length >= 31, "31 messages");
    await sleep(400);
    const snap = await snapshot(rx, "dave");
    const got = snap.received.map((r) => r.payload.n);
    assert.equal(got.length, 31, `each publish written once: ${JSON.stringify(got)}`);
    assert.deepEqual(new Set(got), new Set([...range(30), "same"]));
    assertStrictlyIncreasing(snap.received.map((r) => r.seq));
    t.diagnostic(`of 30 publishes cut by the crash, ${mine.filter((p) => p.duplicate).length} were confirmed as duplicates on retry`);
    await rx.evaluate(() => window.obx.close("dave"));
  });

  test("a silent broker (SIGSTOP) is detected by the heartbeat watchdog; the client reconnects after SIGCONT", async (t) => {
    await start(rx, "erin", { url: broker.url, clientId: "erin", ...FAST });
    // Idle for 2.5 s, over the broker's 1 s heartbeat timeout: the client's pongs keep it open.
    await sleep(2500);
    let snap = await snapshot(rx, "erin");
    assert.equal(snap.state, "open");
    assert.deepEqual(events(snap, "disconnect"), [], "pongs keep an idle connection alive");

    const stoppedAt = Date.now();
    broker.signal("SIGSTOP");
    try {
      snap = await waitSnap(rx, "erin", (s) => events(s, "disconnect").length >= 1, "the watchdog", 10000);
      const d = events(snap, "disconnect")[0];
      assert.equal(d.cause, "heartbeat_timeout");
      const detectedMs = d.at - stoppedAt;
      assert.ok(detectedMs <= HEARTBEAT_MS + GRACE_MS + 1000, `detected after ${detectedMs} ms`);
      t.diagnostic(`dead broker detected ${detectedMs} ms after SIGSTOP (heartbeat ${HEARTBEAT_MS} + grace ${GRACE_MS})`);
      // Published while the broker is frozen; no connection can be made meanwhile.
      await publishMany(tx, "alice", "client:erin", [{ n: "while-stopped" }], "erin");
      await waitSnap(rx, "erin", (s) => events(s, "reconnecting").length >= 3, "retries while the broker is frozen", 10000);
      snap = await snapshot(rx, "erin");
      assert.equal(events(snap, "open").length, 1, "no welcome from a frozen broker");
    } finally {
      broker.signal("SIGCONT");
    }
    const contAt = Date.now();
    snap = await waitSnap(rx, "erin", (s) => s.received.length >= 1 && events(s, "open").length >= 2, "reconnect after SIGCONT", 15000);
    const reopened = events(snap, "open").at(-1);
    t.diagnostic(`reconnected ${reopened.at - contAt} ms after SIGCONT`);
    assert.equal(reopened.resumed, true);
    await sleep(300);
    snap = await snapshot(rx, "erin");
    assert.deepEqual(snap.received.map((r) => r.payload.n), ["while-stopped"]);
    await rx.evaluate(() => window.obx.close("erin"));
  });

  test("messages removed by TTL while the client was away are reported as missed", async () => {
    await start(rx, "fred", { url: broker.url, clientId: "fred", store: "memory", ...FAST });
    await rx.evaluate(() => window.obx.close("fred"));
    for (const n of [1, 2]) await publish(tx, "alice", "client:fred", { n }, { ttlMs: 100 });
    await publish(tx, "alice", "client:fred", { n: "kept" });
    await sleep(700); // the broker sweeps expired messages every 100 ms
    const w = await rx.evaluate(() => window.obx.reconnect("fred"));
    assert.equal(w.missed, 2, JSON.stringify(w));
    const snap = await waitSnap(rx, "fred", (s) => s.received.length >= 1, "the kept message");
    assert.deepEqual(snap.received.map((r) => r.payload.n), ["kept"]);
    const missed = events(snap, "missed");
    assert.equal(missed.length, 1);
    assert.equal(missed[0].count, 2);
    assert.equal(missed[0].source, "welcome");
    await rx.evaluate(() => window.obx.close("fred"));
  });

  test("a lost data directory: the client is told (reset) and takes the new epoch from seq 1", async () => {
    const b2 = new Broker(bin, tempDir("lost"));
    await b2.start();
    await start(tx, "hank", { url: b2.url, clientId: "hank", store: "memory", ...FAST });
    await start(rx, "gina", { url: b2.url, clientId: "gina", ...FAST });
    for (const n of range(3)) await publish(tx, "hank", "client:gina", { n });
    let snap = await waitSnap(rx, "gina", (s) => s.position?.lastSeq === 3, "3 messages acked");
    const oldEpoch = snap.position.epoch;
    await b2.kill();
    b2.dataDir = tempDir("fresh"); // same port, empty data directory
    await b2.start();
    snap = await waitSnap(rx, "gina", (s) => events(s, "reset").length >= 1 && s.state === "open", "the reset");
    const reset = events(snap, "reset")[0];
    assert.equal(reset.reason, "epoch_mismatch");
    assert.deepEqual(reset.previous, { epoch: oldEpoch, lastSeq: 3 });
    assert.notEqual(reset.epoch, oldEpoch);
    for (const n of range(2, 3)) {
      const r = await publish(tx, "hank", "client:gina", { n });
      assert.equal(r.error, undefined, JSON.stringify(r));
    }
    snap = await waitSnap(rx, "gina", (s) => s.received.length >= 5, "2 messages of the new epoch");
    assert.deepEqual(snap.received.map((r) => [r.seq, r.payload.n]), [[1, 0], [2, 1], [3, 2], [1, 3], [2, 4]]);
    assert.equal(snap.received[3].epoch, reset.epoch);
    await rx.evaluate(() => window.obx.close("gina"));
    await tx.evaluate(() => window.obx.close("hank"));
    await b2.shutdown();
  });

  test("the demo page: two people chat through a topic", async () => {
    const open = async (id) => {
      const ctx = await browser.newContext();
      contexts.push(ctx);
      const page = await ctx.newPage();
      page.on("pageerror", (e) => process.stderr.write(`[demo page error] ${e.stack ?? e}\n`));
      await page.goto(`${base}/demo/index.html?url=${encodeURIComponent(broker.url)}&id=${id}&room=lobby`);
      await page.locator('#status[data-state="ready"]').waitFor({ timeout: 10000 }); // subscribed to the room
      return page;
    };
    const ann = await open("ann");
    const ben = await open("ben");
    await ann.fill("#text", "hello from ann");
    await ann.click("#send");
    await ben.locator("#messages li", { hasText: "hello from ann" }).waitFor({ timeout: 10000 });
    await ann.locator("#messages li", { hasText: "hello from ann" }).waitFor({ timeout: 10000 });
    await ben.fill("#text", "hi ann");
    await ben.press("#text", "Enter");
    await ann.locator("#messages li", { hasText: "hi ann" }).waitFor({ timeout: 10000 });
    assert.equal(await ben.locator("#messages li", { hasText: "hello from ann" }).count(), 1);
  });
});
