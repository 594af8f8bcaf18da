"""Relays a unix socket to libvirt's, byte for byte, until it is killed.

Killing this process is, for a client, exactly a libvirt daemon that died: the
connection drops mid-conversation. The real daemon behind it is untouched, so the
test can check afterwards that nothing was half-done and that re-running works.
Usage: socket_relay.py LISTEN_PATH TARGET_PATH
"""

import os
import socket
import sys
import threading


def pump(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(listen_path, target_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen_path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(target_path)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]) or os.EX_OK)
