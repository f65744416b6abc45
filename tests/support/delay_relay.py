"""A TCP relay that holds every chunk for a fixed time in each direction: a test transport that
adds one-way delay where the kernel has no `netem` (DESIGN.md, "Testing what crosses a network").

    python tests/support/delay_relay.py --delay-ms 1 --map 127.0.0.1:5555=10.213.0.2:5555 [--map ...]

listens on each LISTEN address and connects every accepted connection to its TARGET; bytes read
from either side are written to the other no earlier than DELAY after they were read. Prints
"ready" once every listener is bound. Run inside a namespace with `ip netns exec` (tests/support/netns.py,
`start_relay`), so that a stage or client connects to the relay on its own loopback and the
relay's own connection crosses the namespace's veth and rate limit.

Each direction is a reader thread and a writer thread joined by a FIFO of (due time, chunk): the
reader never waits for the delay, so the relay keeps the link's throughput (about
rate x delay bytes are in flight) and the order of the bytes; sleeping per chunk in one thread
would instead add the delay once per chunk, serially. Threads rather than asyncio: the event
loop's timers have millisecond granularity (epoll), which would turn 1 ms into 1-2 ms, while
`time.sleep` is accurate to tens of microseconds.
"""
from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
import time

CHUNK = 1 << 16
# Bounded so a slow receiver pushes back on the sender (TCP flow control) instead of the relay
# buffering without limit; 1024 chunks is far more than 1 Gbit x 1 ms.
MAX_CHUNKS = 1024


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


class _Pipe:
    """One direction of one connection: src -> dst, every chunk due `delay` after it was read."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, on_done) -> None:
        self.src, self.dst, self.delay, self.on_done = src, dst, delay, on_done
        self.q: queue.Queue[tuple[float, bytes | None]] = queue.Queue(MAX_CHUNKS)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                b = self.src.recv(CHUNK)
                self.q.put((time.monotonic() + self.delay, b or None))
                if not b:
                    return
        except OSError:
            self.q.put((0.0, None))

    def _write(self) -> None:
        ok = True
        try:
            while True:
                due, b = self.q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if b is None:
                    # A half-close travels with the same delay and order as the data before it.
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(b)
        except OSError:
            ok = False
        finally:
            self.on_done(ok)


class _Conn:
    def __init__(self, down: socket.socket, target: tuple[str, int], delay: float) -> None:
        self.socks = [down]
        self.lock = threading.Lock()
        self.open_pipes = 2
        try:
            up = socket.create_connection(target, timeout=10)
        except OSError:
            down.close()  # the peer sees a refused/reset connection, as it would without the relay
            return
        up.settimeout(None)
        self.socks.append(up)
        for s in self.socks:
            # ZeroMQ sets TCP_NODELAY on its own sockets; without it here Nagle would add delay.
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Pipe(down, up, delay, self._pipe_done)
        _Pipe(up, down, delay, self._pipe_done)

    def _pipe_done(self, ok: bool) -> None:
        with self.lock:
            self.open_pipes -= 1
            last = self.open_pipes == 0
        if last or not ok:
            for s in self.socks:
                try:
                    # shutdown first: close() alone does not wake a thread blocked in recv().
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


class Relay:
    """Listeners on `maps` (listen -> target pairs), each connection relayed with `delay_s`."""

    def __init__(self, maps: list[tuple[tuple[str, int], tuple[str, int]]], delay_s: float) -> None:
        self.delay = delay_s
        self.listeners = []
        for listen, target in maps:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(listen)
            s.listen(64)
            self.listeners.append((s, target))

    def start(self) -> Relay:
        for s, target in self.listeners:
            threading.Thread(target=self._accept, args=(s, target), daemon=True).start()
        return self

    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname() for s, _ in self.listeners]

    def _accept(self, s: socket.socket, target: tuple[str, int]) -> None:
        while True:
            try:
                down, _ = s.accept()
            except OSError:
                return
            # Connecting upstream can take a while (an absent target): not in the accept loop.
            threading.Thread(target=_Conn, args=(down, target, self.delay), daemon=True).start()

    def close(self) -> None:
        for s, _ in self.listeners:
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    ap.add_argument("--map", action="append", required=True, metavar="LISTEN=TARGET",
                    help="HOST:PORT=HOST:PORT; repeatable")
    args = ap.parse_args(argv)
    maps = []
    for m in args.map:
        listen, _, target = m.partition("=")
        maps.append((_addr(listen), _addr(target)))
    Relay(maps, args.delay_ms / 1e3).start()
    print("ready", flush=True)
    threading.Event().wait()  # until killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
