import Logging
import NIOConcurrencyHelpers
import NIOCore

/// One end of a frame connection, as seen by the code that handles it. `send` never blocks: frames
/// queue in a mailbox that a single writer drains, many frames per write.
public final class FramePeer: Sendable, Hashable {
    private struct State {
        var queue: [Frame] = []
        var waiter: CheckedContinuation<[Frame]?, Never>?
        var closed = false
        var role: PeerRole?
        var instance: String?
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
        let waiter: CheckedContinuation<[Frame]?, Never>?
        let batch: [Frame]?
        (waiter, batch) = state.withLockedValue { s in
            guard !s.closed else { return (nil, nil) }
            s.queue.append(contentsOf: frames)
            guard let w = s.waiter, !s.queue.isEmpty else { return (nil, nil) }
            s.waiter = nil
            let out = s.queue
            s.queue = []
            return (w, out)
        }
        if let waiter { waiter.resume(returning: batch) }
    }

    /// Stops the writer once what is queued has been written; the connection then closes.
    public func close() {
        let waiter = state.withLockedValue { s -> CheckedContinuation<[Frame]?, Never>? in
            s.closed = true
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume(returning: nil)
    }

    /// Takes what is queued without waiting (for inspection in tests).
    func takeQueued() -> [Frame] {
        state.withLockedValue { s in
            defer { s.queue = [] }
            return s.queue
        }
    }

    /// The frames queued since the last call, waiting if there are none; nil once closed and drained.
    func nextFrames() async -> [Frame]? {
        await withCheckedContinuation { (c: CheckedContinuation<[Frame]?, Never>) in
            let immediate: [Frame]?? = state.withLockedValue { s in
                if !s.queue.isEmpty {
                    let out = s.queue
                    s.queue = []
                    return .some(out)
                }
                if s.closed { return .some(nil) }
                s.waiter = c
                return .none
            }
            if let immediate { c.resume(returning: immediate) }
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

/// Runs one connection: a writer draining the peer's mailbox and a reader feeding the handler.
/// A protocol violation is answered with an `error` frame and the connection closed.
func runFrameConnection(
    _ channel: NIOAsyncChannel<Frame, Frame>,
    peer: FramePeer,
    handler: some FrameConnectionHandler,
    logger: Logger
) async {
    do {
        try await channel.executeThenClose { inbound, outbound in
            await handler.connected(peer)
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    do {
                        while let frames = await peer.nextFrames() {
                            try await outbound.write(contentsOf: frames)
                        }
                    } catch {
                        logger.debug("frame connection write failed", metadata: ["error": "\(error)"])
                    }
                    peer.close()
                    // Ends the reader too when the close was decided on this side.
                    channel.channel.close(promise: nil)
                }
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
                peer.close()
                await group.waitForAll()
            }
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
        try pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(maximumFrameLength: maximumFrameLength)))
        try pipeline.syncOperations.addHandler(MessageToByteHandler(FrameEncoder()))
        return try NIOAsyncChannel<Frame, Frame>(wrappingChannelSynchronously: self)
    }
}
