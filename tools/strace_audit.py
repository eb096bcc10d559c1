#!/usr/bin/env python3
"""Durability-ordering audit: proves from the broker's own system calls that every `ok` and every
`msg` frame it wrote to a socket came after an fdatasync that covers the publish.

Usage:
  strace_audit.py load URL_HOSTPORT N         drive a publish load (publisher + acking subscriber)
  strace_audit.py check TRACE [--expect-violations]

`check` reads an `strace -f -ttt -T -xx -s 1000000` trace of `outboxd serve` and:
  1. reassembles the WebSocket frames each connection sent (unmasking them) and notes when each
     `publish` was read (end of the read call);
  2. reassembles the frames the broker wrote and notes when each `ok` and `msg` frame's write
     began;
  3. for each `ok` (matched to its publish by `ref`) and each `msg` (matched by its unique
     payload), requires an fdatasync that began after the publish was read and ended before the
     frame's write began.
Exit status 0 when every frame is covered (and at least one of each kind was checked), 1 on any
violation. With --expect-violations (a durability = "relaxed" run) the exit status is 0 only if
violations were found: proof that the audit can see them.

Only the Python standard library is used.
"""

import base64
import json
import os
import re
import socket
import struct
import sys
import threading

LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
CALL = re.compile(r"^(\w+)\((.*)$")
RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
RESULT = re.compile(r"\)\s+=\s+(-?\d+)(?:\s+\w+\s+\([^)]*\))?\s+<(\d+\.\d+)>\s*$")
HEX = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


def unhex(s):
    return bytes.fromhex(s.replace("\\x", ""))


def parse_trace(path):
    """Yields (pid, name, start, end, args_text, ret) for every finished call."""
    pending = {}
    with open(path, "r", errors="replace") as f:
        for raw in f:
            m = LINE.match(raw.rstrip("\n"))
            if not m:
                continue
            pid, ts, rest = m.group(1), float(m.group(2)), m.group(3)
            if rest.startswith("<..."):
                r = RESUMED.match(rest)
                if not r or pid not in pending:
                    continue
                name, start, head = pending.pop(pid)
                text = head + r.group(2)
            elif rest.endswith("<unfinished ...>"):
                c = CALL.match(rest)
                if c:
                    pending[pid] = (c.group(1), ts, c.group(2)[: -len("<unfinished ...>")])
                continue
            else:
                c = CALL.match(rest)
                if not c:
                    continue
                name, start, text = c.group(1), ts, c.group(2)
            res = RESULT.search(text)
            if not res:
                continue
            ret = int(res.group(1))
            end = start + float(res.group(2))
            yield pid, name, start, end, text, ret


def ws_frames(buf, masked):
    """Splits complete frames off `buf`; returns (frames, rest). frames: (opcode, payload)."""
    out = []
    while True:
        if len(buf) < 2:
            return out, buf
        b0, b1 = buf[0], buf[1]
        n = b1 & 0x7F
        i = 2
        if n == 126:
            if len(buf) < 4:
                return out, buf
            n = struct.unpack(">H", buf[2:4])[0]
            i = 4
        elif n == 127:
            if len(buf) < 10:
                return out, buf
            n = struct.unpack(">Q", buf[2:10])[0]
            i = 10
        key = None
        if b1 & 0x80:
            if len(buf) < i + 4:
                return out, buf
            key = buf[i : i + 4]
            i += 4
        if len(buf) < i + n:
            return out, buf
        data = buf[i : i + n]
        if key:
            data = bytes(b ^ key[j % 4] for j, b in enumerate(data))
        out.append((b0 & 0x0F, data))
        buf = buf[i + n :]


def stream_json(st, data):
    """Appends `data` to one direction of a connection and yields the JSON text frames it
    completes (after the HTTP upgrade; masked or not)."""
    buf = st["buf"] + data
    if not st["upgraded"]:
        k = buf.find(b"\r\n\r\n")
        if k < 0:
            st["buf"] = buf
            return
        buf, st["upgraded"] = buf[k + 4 :], True
    frames, st["buf"] = ws_frames(buf, True)
    for op, payload in frames:
        if op != 1:
            continue
        try:
            yield json.loads(payload)
        except ValueError:
            continue


def check(path, expect_violations):
    sockets = set()
    streams = {}  # (fd, "in" | "out") -> {"buf", "upgraded"}
    publish_read = {}  # (fd, ref) -> time ; payload -> time
    payload_read = {}
    oks, msgs = [], []  # (time, key)
    syncs = []
    for pid, name, start, end, text, ret in parse_trace(path):
        fd_m = re.match(r"\s*(\d+)", text)
        fd = int(fd_m.group(1)) if fd_m else None
        if name == "accept4" and ret >= 0:
            sockets.add(ret)
            streams[(ret, "in")] = {"buf": b"", "upgraded": False}
            streams[(ret, "out")] = {"buf": b"", "upgraded": False}
        elif name == "close" and fd in sockets:
            sockets.discard(fd)
        elif name == "fdatasync" and ret == 0:
            syncs.append((start, end))
        elif name in ("read", "recvfrom") and fd in sockets and ret > 0:
            data = b"".join(unhex(h) for h in HEX.findall(text))[:ret]
            for v in stream_json(streams[(fd, "in")], data):
                if v.get("type") == "publish":
                    publish_read[(fd, json.dumps(v.get("ref")))] = end
                    payload_read[json.dumps(v.get("payload"), sort_keys=True)] = end
        elif name in ("write", "sendto", "writev", "sendmsg") and fd in sockets and ret > 0:
            data = b"".join(unhex(h) for h in HEX.findall(text))[:ret]
            for v in stream_json(streams[(fd, "out")], data):
                if v.get("type") == "ok" and "id" in v:
                    oks.append((start, (fd, json.dumps(v.get("ref")))))
                elif v.get("type") == "msg":
                    msgs.append((start, json.dumps(v.get("payload"), sort_keys=True)))
    syncs.sort()

    def covered(t_read, t_write):
        return any(s >= t_read and e <= t_write for s, e in syncs)

    violations, checked = [], {"ok": 0, "msg": 0}
    for t_write, key in oks:
        t_read = publish_read.get(key)
        if t_read is None:
            continue
        checked["ok"] += 1
        if not covered(t_read, t_write):
            violations.append(("ok", key, t_read, t_write))
    for t_write, key in msgs:
        t_read = payload_read.get(key)
        if t_read is None:
            continue
        checked["msg"] += 1
        if not covered(t_read, t_write):
            violations.append(("msg", key, t_read, t_write))
    print(
        f"audit: {checked['ok']} ok frames and {checked['msg']} msg frames checked against "
        f"{len(syncs)} fdatasync calls; {len(violations)} violation(s)"
    )
    for v in violations[:10]:
        print(f"  violation: {v[0]} {v[1]} read at {v[2]:.6f}, written at {v[3]:.6f} with no fdatasync between")
    if expect_violations:
        if not violations:
            print("audit: FAILED: expected violations (relaxed mode) but found none: the audit is blind")
            return 1
        print("audit: violations found as expected for durability = \"relaxed\"")
        return 0
    if checked["ok"] == 0 or checked["msg"] == 0:
        print("audit: FAILED: nothing was checked (the trace holds no publishes or frames)")
        return 1
    return 1 if violations else 0


class Ws:
    """A minimal WebSocket client (text frames only) on a blocking socket."""

    def __init__(self, hostport):
        host, port = hostport.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.s.recv(4096)
        self.buf = buf.split(b"\r\n\r\n", 1)[1]
        self.pending = []

    def send(self, obj):
        data = json.dumps(obj).encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            hdr = bytes([0x81, 0x80 | n])
        else:
            hdr = bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
        self.s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self):
        while True:
            if self.pending:
                op, payload = self.pending.pop(0)
                if op == 1:
                    return json.loads(payload)
                if op == 8:
                    raise EOFError("closed")
                continue
            frames, self.buf = ws_frames(self.buf, False)
            if frames:
                self.pending.extend(frames)
                continue
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("socket closed")
            self.buf += chunk


def load(hostport, n):
    sub = Ws(hostport)
    sub.send({"type": "hello", "client_id": "audit-sub"})
    assert sub.recv()["type"] == "welcome"
    got = []

    def consume():
        while len(got) < n:
            v = sub.recv()
            if v.get("type") == "msg":
                got.append(v["payload"]["n"])
                sub.send({"type": "ack", "seq": v["seq"]})
            elif v.get("type") == "ping":
                sub.send({"type": "pong"})

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    pub = Ws(hostport)
    pub.send({"type": "hello", "client_id": "audit-pub"})
    assert pub.recv()["type"] == "welcome"
    oks = 0
    batch = 50
    for start in range(0, n, batch):
        k = min(batch, n - start)
        for i in range(start, start + k):
            pub.send({"type": "publish", "ref": i, "to": "client:audit-sub", "payload": {"n": i}})
        while k:
            v = pub.recv()
            if v.get("type") == "ok":
                oks += 1
                k -= 1
            elif v.get("type") == "error":
                raise SystemExit(f"publish refused: {v}")
    t.join(timeout=60)
    print(f"load: {oks} publishes confirmed, {len(got)} delivered")
    if oks != n or len(got) != n:
        raise SystemExit("load: not everything was confirmed and delivered")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "load":
        load(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "check":
        sys.exit(check(sys.argv[2], "--expect-violations" in sys.argv))
    else:
        print(__doc__)
        sys.exit(2)
