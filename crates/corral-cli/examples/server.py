# A plain Python HTTP server that takes its listening socket from corral by
# systemd's convention (LISTEN_FDS / LISTEN_PID, descriptor 3) and stops
# gracefully on SIGTERM — what any socket-activated program does.
import http.server
import os
import signal
import socket
import socketserver
import sys
import threading

if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
    sys.exit("not socket-activated: LISTEN_PID=%r LISTEN_FDS=%r pid=%d"
             % (os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS"), os.getpid()))

SLOT = os.environ["CORRAL_INSTANCE"]


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/env/"):
            body = os.environ.get(self.path[len("/env/"):], "").encode()
        else:
            body = ("hello from worker %s (pid %d)" % (SLOT, os.getpid())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


server = Server(("127.0.0.1", 0), Hello, bind_and_activate=False)
server.socket = socket.socket(fileno=3)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
