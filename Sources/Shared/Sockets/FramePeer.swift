import Logging
import NIOConcurrencyHelpers
import NIOCore

/// One end of a frame connection, as seen by the code that handles it. `send` never blocks: frames
/// queue in a mailbox, and the connection's event loop writes everything queued in one go (one
/// task on the loop per burst of sends, one flush). The frames go straight from the sending
/// thread to the loop: no writer task in between (every thread wake-up costs tens of µs here).
public final class FramePeer: Sendable, Hashable {
    private struct State {
        var queue: [Frame] = []
        /// Set once the connection is up; until then (and in tests) frames only queue.
        var channel: Channel?
        /// A write of the queue is already scheduled on the channel's event loop.
        var scheduled = false
        var closed = false
        var role: PeerRole?
        var instance: String?

        /// The channel to schedule a write on, when frames wait and none is scheduled yet.
        mutating func claimWrite() -> Channel? {
            guard let channel, !scheduled, !queue.isEmpty else { return nil }
            scheduled = true
            return channel
        }
    }

    /// Unique for the life of the process: acks for frames read on an earlier connection can be told apart.
    public let connectionID: UInt64
    private let state = NIOLockedValueBox(State())

    private static let counter = NIOLockedValueBox<UInt64>(0)

    init() {
        connectionID = FramePeer.counter.withLockedValue { $0 += 1; return $0 }
    }

    public var role: PeerRole? { state.withLockedValue { $0.role } }
    public var instance: String? { state.withLockedValue { $0.instance } }
    public var isClosed: Bool { state.withLockedValue { $0.closed } }

    public func identify(role: PeerRole, instance: String) {
        state.withLockedValue {
            $0.role = role
            $0.instance = instance
        }
    }

    public func send(_ frame: Frame) {
        send(contentsOf: CollectionOfOne(frame))
    }

    public func send(contentsOf frames: some Sequence<Frame>) {
        let channel = state.withLockedValue { s -> Channel? in
            guard !s.closed else { return nil }
            s.queue.append(contentsOf: frames)
            return s.claimWrite()
        }
        if let channel { channel.eventLoop.execute { self.writeQueued(to: channel) } }
    }

    /// Stops sending once what is queued has been written; the connection then closes.
    public func close() {
        let channel = state.withLockedValue { s -> Channel? in
            guard !s.closed else { return nil }
            s.closed = true
            return s.channel
        }
        // After any write already scheduled: the loop runs its tasks in order.
        if let channel { channel.eventLoop.execute { self.writeQueued(to: channel, thenClose: true) } }
    }

    /// Connects the mailbox to its channel: what was queued before is written now.
    func attach(_ channel: Channel) {
        let claimed = state.withLockedValue { s -> Channel? in
            s.channel = channel
            return s.claimWrite()
        }
        if let claimed { claimed.eventLoop.execute { self.writeQueued(to: claimed) } }
    }

    /// On the channel's event loop: writes everything queued, flushes once.
    private func writeQueued(to channel: Channel, thenClose: Bool = false) {
        let frames = state.withLockedValue { s -> [Frame] in
            s.scheduled = false
            defer { s.queue = [] }
            return s.queue
        }
        for frame in frames { channel.write(NIOAny(frame), promise: nil) }
        if !frames.isEmpty { channel.flush() }
        if thenClose { channel.close(promise: nil) }
    }

    /// Takes what is queued without waiting (for inspection in tests).
    func takeQueued() -> [Frame] {
        state.withLockedValue { s in
            defer { s.queue = [] }
            return s.queue
        }
    }

    public static func == (a: FramePeer, b: FramePeer) -> Bool { a.connectionID == b.connectionID }
    public func hash(into h: inout Hasher) { h.combine(connectionID) }
}

/// What a process does with a frame connection.
public protocol FrameConnectionHandler: Sendable {
    /// Called once the connection is up (for clients: after `hello` was queued).
    func connected(_ peer: FramePeer) async
    /// Called for each frame, in order. Throwing closes the connection.
    func received(_ frame: Frame, from peer: FramePeer) async throws
    /// Called once, when the connection is gone.
    func disconnected(_ peer: FramePeer) async
}

extension FrameConnectionHandler {
    public func connected(_ peer: FramePeer) async {}
    public func disconnected(_ peer: FramePeer) async {}
}

/// Runs one connection: the peer's mailbox writes straight to the channel, a reader feeds the
/// handler. A protocol violation is answered with an `error` frame and the connection closed.
func runFrameConnection(
    _ channel: NIOAsyncChannel<Frame, Frame>,
    peer: FramePeer,
    handler: some FrameConnectionHandler,
    logger: Logger
) async {
    do {
        try await channel.executeThenClose { inbound, _ in
            peer.attach(channel.channel)
            await handler.connected(peer)
            do {
                for try await frame in inbound {
                    try await handler.received(frame, from: peer)
                }
            } catch let error as FrameError {
                logger.warning(
                    "closing connection after a bad frame",
                    metadata: ["error.code": "\(error.code)", "error": "\(error)", "peer.role": "\(peer.role?.rawValue ?? "-")"])
                peer.send(.error(code: error.code, message: error.description))
            } catch is CancellationError {
            } catch {
                logger.warning("closing connection after a protocol error", metadata: ["error": "\(error)", "peer.role": "\(peer.role?.rawValue ?? "-")"])
                peer.send(.error(code: "PROTOCOL_ERROR", message: "\(error)"))
            }
            // What is queued (an error frame) is written before the connection closes.
            peer.close()
            try? await channel.channel.closeFuture.get()
        }
    } catch {
        logger.debug("frame connection ended", metadata: ["error": "\(error)"])
    }
    peer.close()
    await handler.disconnected(peer)
}

extension Channel {
    /// Adds the frame codec to a new Unix-socket channel and wraps it for async use.
    func frameAsyncChannel(maximumFrameLength: Int) throws -> NIOAsyncChannel<Frame, Frame> {
        try pipeline.syncOperations.addHandler(FrameSplitter(maximumFrameLength: maximumFrameLength))
        try pipeline.syncOperations.addHandler(FrameWriter())
        return try NIOAsyncChannel<Frame, Frame>(wrappingChannelSynchronously: self)
    }
}
