#!/usr/bin/env python3
"""The physical memory a set of processes holds, each page counted once (root).

    python3 bench/resident.py PID...   ->   prints kilobytes: all, anonymous

Summing VmRSS over the workers of `tunegate run` counts every page they share once per worker:
the binary's code and read-only data, libc, mapped once in the page cache and touched by each
of 57 workers, are 57 times in the sum. RssAnon leaves them out entirely. What the host really
spends is in between: every distinct physical page any of the processes has mapped, once. The
kernel says which page backs each virtual page in /proc/PID/pagemap (bits 0-54: the page frame
number, bit 63: present; the frame number reads as 0 without CAP_SYS_ADMIN, which is refused
here rather than reported as one page). Pages swapped out are not resident and not counted.

The second figure counts the private anonymous frames only (pagemap bit 61 clear: heap,
arenas, stacks, copied-on-write library data; what RssAnon sums), each once: equal to RssAnon
summed unless processes share such pages (fork without exec; tunegate's workers are exec'd).

Reading pagemap is a few MB per process: a second or so of one core for 57 workers.
"""

import array
import os
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
PRESENT = 1 << 63
FILE_OR_SHARED = 1 << 61  # a page of the page cache or shared anonymous memory: not RssAnon
PFN_MASK = (1 << 55) - 1


def frames(pid):
    """(every frame, anonymous frames) resident in process `pid`."""
    every, anon = set(), set()
    with open("/proc/%d/maps" % pid) as maps, open("/proc/%d/pagemap" % pid, "rb") as pagemap:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if len(fields) > 5 and fields[5] == "[vsyscall]":
                continue  # above the user address space: pagemap cannot be read there
            pagemap.seek(start // PAGE * 8)
            entries = array.array("Q")
            entries.frombytes(pagemap.read((end - start) // PAGE * 8))
            for e in entries:
                if e & PRESENT:
                    pfn = e & PFN_MASK
                    if pfn == 0:
                        sys.exit("resident.py: page frame numbers read as 0: needs CAP_SYS_ADMIN")
                    every.add(pfn)
                    # Private anonymous, as RssAnon counts it: the heap, arenas, stacks, and
                    # the copied pages of a library's writable data (in a file's mapping).
                    if not e & FILE_OR_SHARED:
                        anon.add(pfn)
    return every, anon


def main(pids):
    every, anon = set(), set()
    for pid in pids:
        try:
            e, a = frames(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile: it holds nothing
        every |= e
        anon |= a
    print(len(every) * PAGE // 1024, len(anon) * PAGE // 1024)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([int(p) for p in sys.argv[1:]])
