import Logging
import NIOConcurrencyHelpers
import NIOCore
import Shared

/// What ingest does with validated batches: stores them and reports whether they were taken.
protocol BatchSink: Sendable {
    /// Whether batches can be taken now (for `/readyz`).
    var isReady: Bool { get }
    func submit(tenant: String, batches: [ValidatedBatch]) async -> SubmitOutcome
}

enum SubmitOutcome: Equatable, Sendable {
    /// Every batch was stored durably.
    case accepted
    /// No room to store the batches: try again after `retryAfter` seconds (429).
    case full(retryAfter: Int)
    /// Cannot store right now (503).
    case unavailable(String)
}

/// The durable path: a batch is stored in the spool (fsync'd) before the client hears 202, and
/// then fed to the router.
struct SpoolingSink: BatchSink {
    let spool: Spool
    let link: RouterLink
    let logger: Logger

    var isReady: Bool { link.isConnected && !spool.isFull }

    func submit(tenant: String, batches: [ValidatedBatch]) async -> SubmitOutcome {
        do {
            _ = try await spool.append(tenant: tenant, batches: batches)
            link.pump()
            return .accepted
        } catch Spool.Failure.full {
            return .full(retryAfter: 5)
        } catch {
            logger.error("cannot write to the spool", metadata: ["error": "\(error)"])
            return .unavailable("the spool cannot be written")
        }
    }
}

/// Feeds the spool to the router over one connection: sends stored batches in order, at most
/// `window` unfinished at a time, and forgets a batch only when the router reports that every
/// destination has it (`ack`, with any dead letters). After a reconnect (router or ingest
/// restarted) everything unfinished is sent again: the router ignores a batch it is already working
/// on, so only batches a crashed router had not finished can arrive twice at a destination.
final class RouterLink: FrameConnectionHandler {
    private struct State {
        var peer: FramePeer?
        var inFlight: Set<Int64> = []
        /// The highest id sent on this connection.
        var cursor: Int64 = 0
        var pumping = false
        var pumpAgain = false
        var paused = false
    }

    private let state = NIOLockedValueBox(State())
    private let spool: Spool
    private let window: Int
    private let logger: Logger

    init(spool: Spool, window: Int = 1024, logger: Logger) {
        self.spool = spool
        self.window = window
        self.logger = logger
    }

    var isConnected: Bool { state.withLockedValue { $0.peer != nil } }

    func connected(_ peer: FramePeer) async {
        state.withLockedValue { s in
            s.peer = peer
            s.inFlight = []
            s.cursor = 0
            s.paused = false
        }
        pump()
    }

    func disconnected(_ peer: FramePeer) async {
        state.withLockedValue { s in
            guard s.peer == peer else { return }
            s.peer = nil
            s.inFlight = []
        }
    }

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        let id = Int64(bitPattern: frame.id)
        switch frame.type {
        case .ack:
            var deadLetters: [Spool.DeadLetter] = []
            if let payload = frame.payload, let dead = try? JSONValue.parse(payload)["dead"]?.arrayValue {
                deadLetters = dead.map {
                    Spool.DeadLetter(
                        destination: $0["destination"]?.stringValue ?? "?", reason: $0["reason"]?.stringValue ?? "",
                        attempts: Int($0["attempts"].flatMap { if case .number(let n) = $0 { n } else { nil } } ?? "0") ?? 0)
                }
                for d in deadLetters {
                    logger.error(
                        "batch dead-lettered for a destination",
                        metadata: ["batch.id": "\(id)", "destination": "\(d.destination)", "reason": "\(d.reason)"])
                }
            }
            spool.complete(id, deadLetters: deadLetters)
            state.withLockedValue { _ = $0.inFlight.remove(id) }
            pump()
        case .nack:
            let reason = frame.reason ?? "no reason given"
            if frame.retryable == true {
                // The router cannot take it now: pause, then send again from this batch on.
                state.withLockedValue { s in
                    s.inFlight.remove(id)
                    s.cursor = min(s.cursor, id - 1)
                    s.paused = true
                }
                Task {
                    try? await Task.sleep(for: .milliseconds(200))
                    self.state.withLockedValue { $0.paused = false }
                    self.pump()
                }
            } else {
                logger.error("the router refused a batch; dead-lettered", metadata: ["batch.id": "\(id)", "reason": "\(reason)"])
                spool.complete(id, deadLetters: [.init(destination: "*", reason: reason, attempts: 1)])
                state.withLockedValue { _ = $0.inFlight.remove(id) }
                pump()
            }
        case .error:
            logger.warning("router reported an error", metadata: ["error.code": "\(frame.code ?? "")", "error": "\(frame.message ?? "")"])
        default:
            throw FrameError.invalidFrame("unexpected \(frame.type.rawValue) frame from the router")
        }
    }

    /// Sends stored batches that the router has not seen on this connection, up to the window.
    func pump() {
        let start = state.withLockedValue { s -> Bool in
            if s.pumping {
                s.pumpAgain = true
                return false
            }
            s.pumping = true
            return true
        }
        guard start else { return }
        while true {
            let plan = state.withLockedValue { s -> (FramePeer, Int64, Int)? in
                guard let peer = s.peer, !s.paused, s.inFlight.count < window else { return nil }
                return (peer, s.cursor, window - s.inFlight.count)
            }
            var sent = false
            if let (peer, cursor, room) = plan {
                do {
                    let batches = try spool.pending(after: cursor, limit: room)
                    if !batches.isEmpty {
                        let frames = batches.map { b -> Frame in
                            var frame = Frame(type: .batch, id: UInt64(bitPattern: b.id))
                            frame.tenant = b.tenant
                            frame.key = b.key
                            frame.payload = b.payload
                            frame.destination = b.destination
                            frame.headers = [Header("sluice-batch-id", "\(self.spool.identity)-\(b.id)")]
                            return frame
                        }
                        state.withLockedValue { s in
                            guard s.peer == peer else { return }
                            s.cursor = batches.last!.id
                            s.inFlight.formUnion(batches.map(\.id))
                        }
                        peer.send(contentsOf: frames)
                        sent = true
                    }
                } catch {
                    logger.error("cannot read the spool", metadata: ["error": "\(error)"])
                }
            }
            let again = state.withLockedValue { s -> Bool in
                if sent || s.pumpAgain {
                    s.pumpAgain = false
                    return true
                }
                s.pumping = false
                return false
            }
            if !again { return }
        }
    }
}
