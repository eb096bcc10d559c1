#!/usr/bin/env python3
"""What writing into the page cache costs, by how recently the memory was used.

Usage: python3 bench/probes/page_touch.py [MIB] [DIR]   (defaults: 450, target)

Writes MIB MiB in 3 MiB writes four times over one file: as a new file, over its cached pages,
over them right after dropping the cache (posix_fadvise DONTNEED), and 5 s after dropping it.
On a virtual machine that hands freed memory back to its host, the first and the last cost
several times the CPU of the two in between: each page is mapped back on its first touch.
"""
import os
import resource
import sys
import time


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 450
    directory = sys.argv[2] if len(sys.argv) > 2 else "target"
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "page-touch.bin")
    chunk = b"y" * (3 << 20)
    count = max(1, mib // 3)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)

    def write_all(what):
        c0, t0 = cpu(), time.monotonic()
        for i in range(count):
            os.pwrite(fd, chunk, i * len(chunk))
        c1, t1 = cpu(), time.monotonic()
        mb = count * len(chunk) / 1e6
        print(f"{what:<44} {mb / (t1 - t0):8.0f} MB/s  {(c1 - c0) / mb * 1e3:6.2f} ms of CPU per MB")

    def drop():
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    try:
        write_all("a new file")
        os.fdatasync(fd)
        write_all("the same file's cached pages")
        drop()
        write_all("the same file, right after dropping its cache")
        drop()
        time.sleep(5)
        write_all("the same file, 5 s after dropping its cache")
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
