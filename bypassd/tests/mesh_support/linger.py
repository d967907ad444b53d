"""Helpers of mesh_edges.rs' FIN-WAIT-2 test, one JSON line per step on stdout.
  client DST DPORT SRC SPORT N  connect, wait for a line on stdin, send N seeded bytes, shutdown(SHUT_WR) (FIN-WAIT-2 while the
                                peer holds its side), then read the answer until EOF
  server PORT N                 read one connection to EOF, wait for a line on stdin, answer N bytes
  echo PORT                     echo every connection back until its EOF (a thread each)
  squat SRC DST DPORT SKIP      one connection from each local port 1..511 but SKIP; after a
                                line on stdin, report every byte that arrived (none is theirs)
"""
import hashlib, json, random, select, socket, sys, threading


def say(**kw):
    print(json.dumps(kw), flush=True)


def payload(seed, n):
    return random.Random(seed).randbytes(n)


def drain(s):
    h, n = hashlib.sha256(), 0
    while True:
        try:
            chunk = s.recv(1 << 16)
        except BlockingIOError:
            # A socket in a sockmap whose blocking read is woken without data (here by
            # its own FIN being acked) gets EAGAIN (tcp_bpf_recvmsg): wait again.
            select.select([s], [], [])
            continue
        if not chunk:
            return h.hexdigest(), n
        h.update(chunk)
        n += len(chunk)


def bound(src, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((src, port))
    return s


def client(dst, dport, src, sport, n):
    s = bound(src, int(sport))
    s.connect((dst, int(dport)))
    say(connected=True)
    sys.stdin.readline()
    data = payload(1, int(n))

    def send():
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        say(lingering=True, sent=hashlib.sha256(data).hexdigest())

    sender = threading.Thread(target=send)
    sender.start()  # read meanwhile: an echo would otherwise fill both ways and stall
    sha, got = drain(s)
    sender.join()
    say(received=sha, bytes=got)
    s.close()


def server(port, n):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", int(port)))
    l.listen(1)
    say(listening=True)
    c, _ = l.accept()
    sha, got = drain(c)
    say(received=sha, bytes=got)
    sys.stdin.readline()
    data = payload(2, int(n))
    c.sendall(data)
    c.close()
    say(sent=hashlib.sha256(data).hexdigest())


def echo(port):
    l = socket.socket(socket.AF_INET6)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("::", int(port)))
    l.listen(1024)
    say(listening=True)

    def one(c):
        while data := c.recv(1 << 16):
            c.sendall(data)
        c.close()

    while True:
        threading.Thread(target=one, args=(l.accept()[0],), daemon=True).start()


def squat(src, dst, dport, skip):
    socks = {}
    for port in range(1, 512):
        if port != int(skip):
            s = bound(src, port)
            s.connect((dst, int(dport)))
            socks[port] = s
    say(ready=len(socks))
    sys.stdin.readline()
    stray = {}
    for port, s in socks.items():
        s.setblocking(False)
        try:
            if data := s.recv(1 << 16):
                stray[port] = len(data)
        except BlockingIOError:
            pass
    say(stray=stray)


{"client": client, "server": server, "echo": echo, "squat": squat}[sys.argv[1]](*sys.argv[2:])
