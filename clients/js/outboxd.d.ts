// Type declarations for outboxd.js, the outboxd client for browsers and Node.js 20+.

/** The WebSocket subprotocol this client speaks: "outboxd.v1.json". */
export const SUBPROTOCOL: "outboxd.v1.json";

/** Where a client stands: every message of `epoch` with a seq <= `lastSeq` is processed. */
export interface Position {
  epoch: string;
  lastSeq: number;
}

/** Keeps a client's position between runs. Both methods may return a Promise. */
export interface PositionStore {
  load(clientId: string): Position | null | undefined | Promise<Position | null | undefined>;
  save(clientId: string, position: Position): void | Promise<void>;
}

/** A position store in memory (lost with the page or process). */
export function memoryStore(): PositionStore;

/** A position store in Web Storage: key `prefix + clientId` (default prefix "outboxd:position:"). */
export function localStorageStore(options?: {
  prefix?: string;
  storage?: Pick<Storage, "getItem" | "setItem" | "removeItem">;
}): PositionStore & { clear(clientId: string): void };

/** A fresh idempotency key: a random prefix drawn once (24 hex digits), "-", a counter (12 hex digits). */
export function newKey(): string;
/** The `exp` claim (Unix seconds) of a JSON Web Token, read without checking it; null when none. */
export function tokenExpiry(token: string | null | undefined): number | null;

/** An error from the broker (an `error` frame) or from the client. Branch on `code`. */
export class OutboxdError extends Error {
  constructor(code: string, message: string, details?: Record<string, unknown>);
  name: "OutboxdError";
  /**
   * The broker's codes (bad_frame, bad_ack, unknown_type, bad_client_id, bad_topic, unauthorized,
   * forbidden, outbox_full, key_reused, payload_too_large, rate_limited, internal), or the client's:
   * closed, replaced, refused, aborted, frame_too_large, handler_failed, store_failed,
   * connect_failed, bad_url, no_websocket, bad_frame_from_broker, token_failed.
   */
  code: string;
  /** The `ref` of the request the broker refused, when there was one. */
  ref?: unknown;
  /** For handler_failed: the seq of the message whose handler threw. */
  seq?: number;
  /** The WebSocket close code, for closes that end the client (refused, replaced). */
  closeCode?: number;
  cause?: unknown;
}

/** One message, handed to the application once. */
export interface Delivery<P = unknown> {
  /** Position in this client's outbox, within `epoch`. */
  readonly seq: number;
  readonly epoch: string;
  /** The message id (the same for every recipient of one topic publish). */
  readonly id: string;
  /** When the broker accepted the publish, ms since the Unix epoch. */
  readonly ts: number;
  /** The publisher's client id. */
  readonly from?: string;
  /** The topic, for messages published to a topic. */
  readonly topic?: string;
  /** The JSON payload (undefined for a binary payload). */
  readonly payload: P;
  /** The binary payload (published as bytes), else undefined. */
  readonly bytes?: Uint8Array;
  /** The broker may have sent it before (a hint; the client already dropped true duplicates). */
  readonly redelivered: boolean;
  /** Whether ack() was called. */
  readonly acked: boolean;
  /** Acknowledges the message (with autoAck: false; harmless to call twice). */
  ack(): void;
}

/** The broker's welcome, in camelCase. */
export interface Welcome {
  clientId: string;
  epoch: string;
  resumed: boolean;
  reason?: "epoch_mismatch" | "ahead";
  lastSeq: number;
  nextSeq: number;
  pending: number;
  missed: number;
  heartbeatMs: number;
  maxInflight: number;
}

export interface PublishResult {
  /** The message id its recipients see. */
  id: string;
  /** How many outboxes were written. */
  recipients: number;
  /** True when the key had been seen already: nothing new was written. */
  duplicate: boolean;
  /** Topic subscribers skipped because their outbox was full. */
  refused: Array<{ client_id: string; code: string }>;
  /** The idempotency key used (given or generated). */
  key: string;
}

export interface PublishOptions {
  /** Idempotency key (1 to 256 bytes); one is generated when absent (see `newKey`). */
  key?: string;
  /** Lifetime of this message's copies, in ms. */
  ttlMs?: number;
  /** Stops waiting (and resending). A publish already sent may still be written. */
  signal?: AbortSignal;
}

export type ClientState = "idle" | "connecting" | "open" | "waiting" | "closed";

export type DisconnectCause =
  | "closed" // the broker or the network closed the connection
  | "heartbeat_timeout" // nothing heard for heartbeat_ms + heartbeatGraceMs
  | "connect_timeout" // no welcome within connectTimeoutMs
  | "handler_failed" // the message handler threw
  | "prepare_failed" // url() or token() threw
  | "token_expired" // close 1008 at the token's expiry, with a token function: reconnecting with a new token
  | "replaced" // close 4000: not reconnecting
  | "refused"; // close 1002 or 1008: not reconnecting

export interface OutboxdEvents {
  /** Every welcome (first connect and each reconnect). */
  open: Welcome;
  disconnect: { code: number | null; reason: string; cause: DisconnectCause; willReconnect: boolean };
  reconnecting: { attempt: number; delayMs: number; cause: string };
  /** Messages retention removed before they were acked: from the welcome, or a seq gap seen live. */
  missed: { count: number; epoch: string; source: "welcome" | "gap"; afterSeq: number; beforeSeq?: number };
  /** The stored position belonged to another incarnation of the outbox; the client now stands at
   * the broker's `epoch` and `lastSeq`, and the seqs that follow are above `lastSeq`. */
  reset: { reason: string; previous: Position; epoch: string; lastSeq: number };
  error: OutboxdError;
  /** Another connection with this client id took over (close 4000); the client has stopped. */
  replaced: { code: number; reason: string };
  state: ClientState;
}

export interface BackoffOptions {
  /** First delay (default 250). */
  initialMs?: number;
  /** Cap (default 30000). */
  maxMs?: number;
  /** Growth per attempt (default 2). */
  multiplier?: number;
  /** Fraction of each delay taken off at random, 0 to 1 (default 0.5). */
  jitter?: number;
}

export interface OutboxdClientOptions<P = unknown> {
  /** ws://HOST:PORT/ws, or a function giving it (called before each connection attempt). */
  url: string | (() => string | Promise<string>);
  /** 1 to 128 characters of [A-Za-z0-9._:@-]. */
  clientId: string;
  /**
   * Sent in hello; a function is called before each connection attempt, and, while connected
   * with a JWT that has an `exp`, a fifth of the time left before it (1 s to 60 s before) to
   * send the new token in a `refresh` frame, so the session outlives its token.
   */
  token?: string | (() => string | Promise<string>);
  /** Where the position is kept (default: localStorage when there is one, else memory). */
  store?: PositionStore;
  /** Called once per message, in seq order, one at a time; acked when it returns or resolves. */
  onMessage?: (delivery: Delivery<P>) => void | Promise<void>;
  /** Ack after onMessage returns (default true); false: call delivery.ack() yourself. */
  autoAck?: boolean;
  /**
   * For a client that only publishes (default false): when a connection ends with nothing
   * stored for this client (no message, subscription or loss to tell), the broker forgets it.
   */
  transient?: boolean;
  /** Silence tolerated beyond the broker's heartbeat_ms before reconnecting (default 5000). */
  heartbeatGraceMs?: number;
  /** Time allowed from opening the socket to the welcome (default 10000). */
  connectTimeoutMs?: number;
  backoff?: BackoffOptions;
  /** A WebSocket class, where there is no global one (default: globalThis.WebSocket). */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket;
  /** Frames larger than this are refused before sending (default 131072, the broker's default). */
  maxFrameBytes?: number;
  /** The random source for jitter (default Math.random). */
  random?: () => number;
  onOpen?: (e: OutboxdEvents["open"]) => void;
  onDisconnect?: (e: OutboxdEvents["disconnect"]) => void;
  onReconnecting?: (e: OutboxdEvents["reconnecting"]) => void;
  onMissed?: (e: OutboxdEvents["missed"]) => void;
  onReset?: (e: OutboxdEvents["reset"]) => void;
  onError?: (e: OutboxdEvents["error"]) => void;
  onReplaced?: (e: OutboxdEvents["replaced"]) => void;
  onStateChange?: (e: OutboxdEvents["state"]) => void;
}

export interface OutboxdStats {
  connects: number;
  delivered: number;
  duplicates: number;
  acked: number;
  published: number;
  pendingRequests: number;
  queued: number;
}

export class OutboxdClient<P = unknown> {
  constructor(options: OutboxdClientOptions<P>);
  readonly clientId: string;
  readonly state: ClientState;
  /** The position in force, or null before the first welcome. */
  readonly position: Position | null;
  readonly stats: OutboxdStats;
  /** The message handler; deliveries wait (unacked) while there is none. */
  onMessage: ((delivery: Delivery<P>) => void | Promise<void>) | null;

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof OutboxdEvents>(type: K, listener: (e: OutboxdEvents[K]) => void): () => void;
  off<K extends keyof OutboxdEvents>(type: K, listener: (e: OutboxdEvents[K]) => void): void;

  /** Connects, and keeps reconnecting until close(). Resolves with the first welcome. */
  connect(): Promise<Welcome>;
  /** Stops. Unanswered requests are rejected with code "closed". */
  close(): void;

  /** Acks by seq or delivery (for autoAck: false). */
  ack(delivery: Delivery | number): void;

  /**
   * Publishes to "client:ID" or "topic:NAME"; resolves once durable in every recipient's
   * outbox. Resent with the same key across reconnects until confirmed. Uint8Array and
   * ArrayBuffer payloads go as binary (payload_b64).
   */
  publish(to: string, payload: unknown, options?: PublishOptions): Promise<PublishResult>;
  /** A durable subscription; resolves once on disk. */
  subscribe(topic: string, options?: { signal?: AbortSignal }): Promise<void>;
  unsubscribe(topic: string, options?: { signal?: AbortSignal }): Promise<void>;
}

export default OutboxdClient;
