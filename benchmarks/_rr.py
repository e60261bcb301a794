"""TCP request/response for the forwarding benchmark: `server PORT` answers each byte
with a byte; `client IP PORT COUNT` prints the round-trip times (seconds) as JSON."""
import json
import socket
import sys
import time


def server(port: int) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(8)
    while True:
        conn, _ = s.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while (b := conn.recv(1)):
            conn.sendall(b)
        conn.close()


def client(ip: str, port: int, count: int) -> None:
    s = socket.create_connection((ip, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(50):  # warm-up: caches, neighbour entries
        s.sendall(b"x"); s.recv(1)
    for _ in range(count):
        t = time.perf_counter()
        s.sendall(b"x")
        s.recv(1)
        rtts.append(time.perf_counter() - t)
    s.close()
    print(json.dumps(rtts))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
