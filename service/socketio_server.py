"""The Socket.IO server: python-socketio on an Engine.IO server that writes to WebSocket clients directly.

python-engineio gives every client a packet queue and a writer task, and `emit` adds a task per recipient on
top: for one event fanned out to many subscribers that is most of the cost, and for an idle subscriber most of
its memory. Here a client on the WebSocket transport gets each small packet written straight to its connection
while it keeps up. A large packet, or any packet for a client that has fallen behind, goes to that client's
backlog, written by one task until it is empty: a slow client never holds up the others, and its packets stay in
order. Polling clients, and the packets queued before a WebSocket takes over (the open packet, or whatever was
sent during a polling-to-WebSocket upgrade), go through engineio's queue as before.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import engineio
import socketio
from engineio import packet
from engineio.async_socket import AsyncSocket

Data = str | bytes
# characters, so at most 16 KiB of UTF-8: what aiohttp compresses on the loop rather than in a thread
FAST_WRITE_MAX = 4096


class DirectSocket(AsyncSocket):  # type: ignore[misc]
    """An Engine.IO socket whose WebSocket transport has no writer task while the client keeps up."""

    connected: bool  # engineio's attributes this class uses
    last_ping: float | None
    queue: Any  # engineio's packet queue; None once the socket writes directly
    ws: Any = None  # engineio's WebSocket wrapper, once this socket writes to it directly
    transport: asyncio.WriteTransport | None = None
    backlog: deque[Data] | None = None  # packets waiting for a client that fell behind, written by `drainer`
    drainer: asyncio.Task[None] | None = None

    async def send(self, pkt: packet.Packet) -> None:
        if self.ws is None:
            await super().send(pkt)
        elif await self.check_ping_timeout():
            await self.write(pkt.encode())

    async def close(self, wait: bool = True, abort: bool = False, reason: str | None = None) -> None:
        if self.ws is not None:
            # nothing queued to wait for: the packets are written, or in the backlog, in order
            await super().close(wait=False, abort=abort, reason=reason)
        else:
            await super().close(wait=wait, abort=abort, reason=reason)
            self.queue.put_nowait(None)  # answers a pending long poll now, not at its timeout

    def schedule_ping(self) -> None:
        """engineio's, with a timer instead of a task asleep for the whole ping interval."""
        if self.last_ping:
            self.last_ping = None
            asyncio.get_running_loop().call_later(self.server.ping_interval, self._ping)

    def _ping(self) -> None:
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            self.server.start_background_task(self.send, packet.Packet(packet.PING))

    async def write(self, data: Data) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the connection is going: the reader loop ends the socket
        if self.backlog is None and self._keeps_up(len(data)):
            try:
                await self.ws.send(data)
            except ConnectionError:
                pass  # closing: the reader loop ends the socket
        else:
            self._push(data)

    def _push(self, data: Data) -> None:
        if self.backlog is None:
            self.backlog = deque()
            self.drainer = asyncio.create_task(self._drain())
        self.backlog.append(data)

    def _keeps_up(self, size: int) -> bool:
        """Nothing waits in the transport's buffer and the packet is small: aiohttp then writes (and compresses, if
        the client asked for that) the frame without suspending, so the caller's loop over clients never waits."""
        assert self.transport is not None
        return size <= FAST_WRITE_MAX and self.transport.get_write_buffer_size() == 0

    async def _drain(self) -> None:
        assert self.backlog is not None
        try:
            while self.backlog:
                await self.ws.send(self.backlog.popleft())
        except ConnectionError:
            pass  # the client is gone; the reader loop ends the socket
        finally:
            self.backlog = self.drainer = None

    async def _websocket_handler(self, ws: Any) -> None:
        """engineio's WebSocket handler (upgrade handshake, then read until the client goes), with the writer
        task replaced by direct writes."""
        if self.connected:  # an upgrade from polling
            if not await self._upgrade(ws):
                return
        else:
            self.connected = True
        self.upgraded = True
        self._take_over(ws)
        timeout = self.server.ping_interval + self.server.ping_timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    data = await ws.wait()
            except (OSError, TimeoutError):
                break
            try:
                await self.receive(packet.Packet(encoded_packet=data))
            except engineio.exceptions.UnknownPacketError:
                pass
            except engineio.exceptions.SocketIsClosedError:
                break
            except Exception:
                self.server.logger.exception("Unknown receive error")
        if self.drainer is not None:
            self.drainer.cancel()
        await ws.close()
        await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)

    async def _upgrade(self, ws: Any) -> bool:
        """The polling-to-WebSocket upgrade handshake: probe, end the pending poll, wait for the upgrade packet.
        Packets sent meanwhile wait in the queue (`upgrading` holds them there)."""
        self.upgrading = True
        try:
            probe = packet.Packet(encoded_packet=await ws.wait())
            if probe.packet_type != packet.PING or probe.data != "probe":
                return False
            await ws.send(packet.Packet(packet.PONG, data="probe").encode())
            await self.queue.put(packet.Packet(packet.NOOP))  # ends the poll the client has open
            upgrade = packet.Packet(encoded_packet=await ws.wait())
            return bool(upgrade.packet_type == packet.UPGRADE)
        except OSError:
            return False
        finally:
            self.upgrading = False

    def _take_over(self, ws: Any) -> None:
        """From now on packets are written directly, after what the queue holds. No await here, so nothing can
        be sent in between."""
        queued = []
        while not self.queue.empty():
            pkt = self.queue.get_nowait()
            if pkt is not None:
                queued.append(pkt.encode())
        self.queue = None  # a direct socket has no use for it (four deques: 3 KB per client)
        self.ws = ws
        self.transport = ws.environ["aiohttp.request"].transport
        for data in queued:
            self._push(data)


class DirectEngine(engineio.AsyncServer):  # type: ignore[misc]
    """engineio's server, with `DirectSocket`s."""

    async def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "connect":
            # engineio builds every socket as an AsyncSocket, with no hook to choose the class; its connect
            # event comes right after, before any transport has used the socket
            socket = self.sockets.get(args[0])
            if type(socket) is AsyncSocket:
                socket.__class__ = DirectSocket
        return await super()._trigger_event(event, *args, **kwargs)


class SocketIOServer(socketio.AsyncServer):  # type: ignore[misc]
    def _engineio_server_class(self) -> type[engineio.AsyncServer]:
        return DirectEngine

    async def fan_out(self, event: str, data: Any, eio_sids: Iterable[str], namespace: str) -> None:
        """`emit` to the clients on `eio_sids`, with the packet encoded once and no task per recipient: a client
        on WebSocket gets it written at once (or backlogged, if behind), any other the engineio way (queued)."""
        encoded = self.packet_class(socketio.packet.EVENT, namespace=namespace, data=[event, data]).encode()
        assert isinstance(encoded, str), "binary data would encode as several packets"
        pkt = packet.Packet(packet.MESSAGE, encoded)
        text = pkt.encode()
        for eio_sid in eio_sids:
            socket = self.eio.sockets.get(eio_sid)
            if isinstance(socket, DirectSocket) and socket.ws is not None and not socket.closed:
                await socket.write(text)
            else:
                await self.eio.send_packet(eio_sid, pkt)
