"""Relays a unix socket to libvirt's, byte for byte, until it is killed.

Killing this process is, for a client, exactly a libvirt daemon that died: the
connection drops mid-conversation. The real daemon behind it is untouched, so the
test can check afterwards that nothing was half-done and that re-running works.

With ``--lose-reply-of PROC`` it reads libvirt's RPC framing (src/rpc/virnetprotocol.x:
a 4-byte big-endian length that counts itself, then program, version, procedure,
type, serial, status) and, when the daemon answers that procedure (e.g. 350,
REMOTE_PROC_DOMAIN_DEFINE_XML_FLAGS), drops the answer and cuts that client's
connection: the daemon did the work, the client never hears so. Later connections
are relayed as usual.
Usage: socket_relay.py LISTEN_PATH TARGET_PATH [--lose-reply-of PROC]
"""

import os
import socket
import struct
import sys
import threading


def close(*sockets):
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pump(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        close(source, sink)


def pump_losing(source, sink, procedure, lost):
    """Relay whole RPC packets from the daemon; the first reply to ``procedure`` is
    dropped and both ends are cut (once per relay: ``lost`` remembers it)."""
    buffer = b""
    try:
        while data := source.recv(65536):
            buffer += data
            while len(buffer) >= 4 and len(buffer) >= struct.unpack(">I", buffer[:4])[0]:
                length = struct.unpack(">I", buffer[:4])[0]
                packet, buffer = buffer[:length], buffer[length:]
                proc = struct.unpack(">I", packet[12:16])[0] if length >= 16 else None
                if proc == procedure and not lost.is_set():
                    lost.set()
                    return
                sink.sendall(packet)
    except OSError:
        pass
    finally:
        close(source, sink)


def main(listen_path, target_path, procedure=None):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen_path)
    server.listen(16)
    print("ready", flush=True)
    lost = threading.Event()
    while True:
        client, _ = server.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(target_path)
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        if procedure is None:
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        else:
            threading.Thread(target=pump_losing, args=(upstream, client, procedure, lost),
                             daemon=True).start()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    procedure = None
    if "--lose-reply-of" in arguments:
        at = arguments.index("--lose-reply-of")
        procedure = int(arguments[at + 1])
        del arguments[at:at + 2]
    sys.exit(main(arguments[0], arguments[1], procedure) or os.EX_OK)
