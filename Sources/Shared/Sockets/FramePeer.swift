import Logging
import NIOConcurrencyHelpers
import NIOCore

/// One end of a frame connection, as seen by the code that handles it. `send` never blocks: frames
/// queue in a mailbox, and the connection's event loop writes everything queued in one go (one
/// task on the loop per burst of sends, one flush). The frames go straight from the sending
/// thread to the loop: no writer task in between (every thread wake-up costs tens of µs here).
///
/// The write waits behind the loop's jobs already queued while the burst still grows: a process
/// whose readers and core run on the loop the connection writes from (the router) handles a read's
/// frames as a chain of loop jobs, one hop at a time, and a write scheduled at once would go out
/// between them — one `write` (and one wake-up of the peer) per frame. So the scheduled write goes
/// round the loop's queue again until `quietPasses` passes in a row brought no new frame (a frame
/// takes a few hops: to the core's actor and back to its reader), at most `maxDeferrals` passes or
/// until `maxDeferredFrames` wait, then writes them all. A pass through an idle loop costs about a
/// microsecond; a `write` and the peer's wake-up tens.
public final class FramePeer: Sendable, Hashable {
    /// Passes through the loop's queue a scheduled write waits at most while frames keep coming.
    static let maxDeferrals = 16
    /// Passes in a row without a new frame after which the write goes out.
    static let quietPasses = 2
    /// Frames queued past which the write goes out at once.
    static let maxDeferredFrames = 256

    private struct State {
        var queue: [Frame] = []
        /// Set once the connection is up; until then (and in tests) frames only queue.
        var channel: Channel?
        /// A write of the queue is already scheduled on the channel's event loop.
        var scheduled = false
        /// Passes the scheduled write has waited, the queue's length at the last one, and the
        /// passes in a row that found it unchanged.
        var deferrals = 0
        var queuedAtLastPass = 0
        var quiet = 0
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

    /// On the channel's event loop: writes everything queued, flushes once — after waiting behind
    /// the loop's queued jobs while the queue still grows (see the type's comment).
    private func writeQueued(to channel: Channel, thenClose: Bool = false) {
        let frames = state.withLockedValue { s -> [Frame]? in
            s.quiet = s.queue.count == s.queuedAtLastPass ? s.quiet + 1 : 0
            if !thenClose, !s.closed, s.quiet < Self.quietPasses, s.deferrals < Self.maxDeferrals,
                s.queue.count < Self.maxDeferredFrames
            {
                s.deferrals += 1
                s.queuedAtLastPass = s.queue.count
                return nil
            }
            s.scheduled = false
            s.deferrals = 0
            s.queuedAtLastPass = 0
            s.quiet = 0
            defer { s.queue = [] }
            return s.queue
        }
        guard let frames else {
            channel.eventLoop.execute { self.writeQueued(to: channel) }
            return
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
        try syncOptions?.setOption(.recvAllocator, value: frameReadBuffers)
        try pipeline.syncOperations.addHandler(FrameSplitter(maximumFrameLength: maximumFrameLength))
        try pipeline.syncOperations.addHandler(FrameWriter())
        return try NIOAsyncChannel<Frame, Frame>(wrappingChannelSynchronously: self)
    }
}

/// Reads on frame connections: up to 256 KB at a time (NIO's default: 64 KB). A frame a read cuts
/// is copied whole (`FrameSplitter`), and per event a frame to kafka-out is ≈ 36 KB: with 64 KB
/// reads nearly every frame was cut, and those copies were ≈ 4% of kafka-out's CPU.
let frameReadBuffers = AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 65536, maximum: 256 * 1024)
