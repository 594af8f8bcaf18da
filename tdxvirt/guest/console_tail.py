"""The last lines a TD printed on its serial console, read through libvirt.

`selftest` keeps them for a step that fails (a guest that never reached its agent shows
how far it booted: firmware, boot loader, kernel panic). The console is libvirt's
stream (virDomainOpenConsole), so it works for a remote URI as for this host and reads
nothing of this machine. The guest is hostile: only the last ``limit`` bytes are kept
whatever it prints, terminal escape sequences are dropped and every other control
character is shown escaped (textsafe.safe), each line capped.

A thread blocks in the stream's recv (libvirt's streams need no event loop that way);
``close`` aborts the stream, which ends the recv. A console someone else holds, or a
TD without one, leaves the tail empty: it is a report's extra, never a failure.
"""

from __future__ import annotations

import re
import threading

from ..textsafe import cap, safe

LIMIT = 64 * 1024  # bytes kept: the last screens of output
LINE_LIMIT = 400  # characters per line in the report
# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \), and two-byte ESC sequences:
# what firmware and kernels write to clear and position the screen.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


class ConsoleTail:
    def __init__(self, limit: int = LIMIT):
        self.limit = limit
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._stream = None
        self._conn = None
        self._thread: threading.Thread | None = None

    def open(self, uri: str, uuid: str) -> bool:
        """Start reading the console of the domain ``uuid`` at ``uri`` (after closing any
        earlier one: a TD's reboot is a new QEMU, with a new console). False when
        libvirt refuses it. The stream has a connection of its own: a blocked recv on
        the caller's connection stalled that connection's other calls (seen with the
        remote driver while the guest's console was quiet)."""
        from ..errors import TdxvirtError
        from ..virt.conn import libvirt_error_type, open_connection

        self.close()
        try:
            conn = open_connection(uri)
        except TdxvirtError:
            return False
        try:
            stream = conn.newStream(0)
            # not forced: a user's console session is left alone
            conn.lookupByUUIDString(uuid).openConsole(None, stream, 0)
        except libvirt_error_type():
            conn.close()
            return False
        self._conn, self._stream = conn, stream
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True,
                                        name="console-tail")
        self._thread.start()
        return True

    def _read(self, stream) -> None:
        from ..virt.conn import libvirt_error_type

        while True:
            try:
                data = stream.recv(4096)
            except libvirt_error_type():  # aborted by close, or the QEMU went away
                return
            if not isinstance(data, bytes) or not data:
                return
            with self._lock:
                self._buffer.extend(data)
                if len(self._buffer) > self.limit:
                    del self._buffer[:len(self._buffer) - self.limit]

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.abort()
            except Exception:  # noqa: BLE001  (a stream whose QEMU already ended)
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001  (a connection whose daemon went away)
                pass

    def lines(self, count: int) -> list[str]:
        """The last ``count`` non-empty lines, made safe to print and to store."""
        with self._lock:
            text = bytes(self._buffer).decode("utf-8", errors="replace")
        text = _ESCAPES.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
        lines = [line for line in text.split("\n") if line.strip()]
        return [cap(safe(line), LINE_LIMIT) for line in lines[-count:]]
