#!/usr/bin/env python3
"""The CPU one small write + fdatasync costs on this machine, at a fixed rate.

Usage: python3 bench/probes/fsync_floor.py [RATE] [SECONDS] [DIR]   (defaults: 5000, 4, target)

Writes 600 bytes over blocks already written, then fdatasyncs, RATE times a second for SECONDS,
and prints the process's CPU per sync (user and kernel). A broker that syncs every message
before it confirms cannot spend less CPU per message than this at a rate where each commit holds
one message. The file (64 MiB, written first) is removed at the end.
"""
import os
import resource
import sys
import time


def main():
    rate = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    directory = sys.argv[3] if len(sys.argv) > 3 else "target"
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "fsync-floor.bin")
    size = 64 << 20
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.pwrite(fd, b"\0" * size, 0)
        os.fsync(fd)
        record = b"x" * 600
        n = int(rate * seconds)
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        due = start
        at = 0
        for _ in range(n):
            os.pwrite(fd, record, at)
            at = (at + len(record)) % (size - len(record))
            os.fdatasync(fd)
            due += 1 / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        took = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.close(fd)
        os.unlink(path)
    user = (after.ru_utime - before.ru_utime) / n * 1e6
    kernel = (after.ru_stime - before.ru_stime) / n * 1e6
    print(f"{n / took:.0f} syncs/s for {took:.1f} s: {user + kernel:.1f} µs of CPU per sync "
          f"({user:.1f} user, {kernel:.1f} kernel)")


if __name__ == "__main__":
    main()
