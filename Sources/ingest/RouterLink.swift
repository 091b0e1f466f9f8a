import Logging
import NIOConcurrencyHelpers
import NIOCore
import Shared

/// What ingest does with validated batches: hands them on and reports whether they were taken.
protocol BatchSink: Sendable {
    /// Whether batches can be taken now (for `/readyz`).
    var isReady: Bool { get }
    func submit(tenant: String, batches: [ValidatedBatch]) async -> SubmitOutcome
}

enum SubmitOutcome: Equatable, Sendable {
    /// Every batch was taken.
    case accepted
    /// Try again later (router not connected, backlog full, timeout).
    case unavailable(String)
    /// Refused for good (for example a tenant the router does not know).
    case rejected(String)
}

/// ingest's connection to the router. Batches are pipelined on one connection; each request waits
/// only for the acks of its own batches. A lost connection or a timeout answers 503, never 202.
final class RouterLink: FrameConnectionHandler, BatchSink {
    private struct State {
        var peer: FramePeer?
        var nextID: UInt64 = 1
        var pending: [UInt64: PendingRequest] = [:]
    }

    private let state = NIOLockedValueBox(State())
    private let timeout: Duration
    private let logger: Logger

    init(timeout: Duration, logger: Logger) {
        self.timeout = timeout
        self.logger = logger
    }

    var isReady: Bool { state.withLockedValue { $0.peer != nil } }

    func connected(_ peer: FramePeer) async {
        state.withLockedValue { $0.peer = peer }
    }

    func disconnected(_ peer: FramePeer) async {
        let orphans: [PendingRequest] = state.withLockedValue { s in
            guard s.peer == peer else { return [] }
            s.peer = nil
            var seen = Set<ObjectIdentifier>()
            let requests = s.pending.values.filter { seen.insert(ObjectIdentifier($0)).inserted }
            s.pending = [:]
            return requests
        }
        for r in orphans { r.finish(.unavailable("the router connection was lost")) }
    }

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        switch frame.type {
        case .ack, .nack:
            guard let request = state.withLockedValue({ $0.pending.removeValue(forKey: frame.id) }) else { return }
            if frame.type == .ack {
                request.acknowledged()
            } else if frame.retryable == true {
                request.finish(.unavailable(frame.reason ?? "the router cannot take the batch now"))
            } else {
                request.finish(.rejected(frame.reason ?? "the router refused the batch"))
            }
        case .error:
            logger.warning("router reported an error", metadata: ["error.code": "\(frame.code ?? "")", "error": "\(frame.message ?? "")"])
        default:
            throw FrameError.invalidFrame("unexpected \(frame.type.rawValue) frame from the router")
        }
    }

    func submit(tenant: String, batches: [ValidatedBatch]) async -> SubmitOutcome {
        let request = PendingRequest(count: batches.count)
        let frames: [Frame]? = state.withLockedValue { s in
            guard s.peer != nil else { return nil }
            return batches.map { batch in
                let id = s.nextID
                s.nextID += 1
                s.pending[id] = request
                var frame = Frame(type: .batch, id: id)
                frame.tenant = tenant
                frame.key = batch.mpid
                frame.payload = batch.bytes
                return frame
            }
        }
        guard let frames, let peer = state.withLockedValue({ $0.peer }) else {
            return .unavailable("not connected to the router")
        }
        let ids = frames.map(\.id)
        peer.send(contentsOf: frames)
        let timeout = self.timeout
        let outcome = await withTaskGroup(of: SubmitOutcome?.self) { group in
            group.addTask { await request.wait() }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return nil
            }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        if let outcome { return outcome }
        state.withLockedValue { s in for id in ids { s.pending[id] = nil } }
        request.finish(.unavailable("the router did not answer in time"))
        return .unavailable("the router did not answer in time")
    }
}

/// One HTTP request's batches in flight: finished when all are acked or the first one fails.
final class PendingRequest: Sendable {
    private struct State {
        var remaining: Int
        var outcome: SubmitOutcome?
        var waiter: CheckedContinuation<SubmitOutcome, Never>?
    }

    private let state: NIOLockedValueBox<State>

    init(count: Int) {
        state = NIOLockedValueBox(State(remaining: count))
    }

    func acknowledged() {
        let resume = state.withLockedValue { s -> (CheckedContinuation<SubmitOutcome, Never>, SubmitOutcome)? in
            guard s.outcome == nil else { return nil }
            s.remaining -= 1
            guard s.remaining == 0 else { return nil }
            s.outcome = .accepted
            defer { s.waiter = nil }
            return s.waiter.map { ($0, .accepted) }
        }
        if let (c, o) = resume { c.resume(returning: o) }
    }

    func finish(_ outcome: SubmitOutcome) {
        let resume = state.withLockedValue { s -> CheckedContinuation<SubmitOutcome, Never>? in
            guard s.outcome == nil else { return nil }
            s.outcome = outcome
            defer { s.waiter = nil }
            return s.waiter
        }
        resume?.resume(returning: outcome)
    }

    func wait() async -> SubmitOutcome {
        await withCheckedContinuation { c in
            let ready = state.withLockedValue { s -> SubmitOutcome? in
                if let o = s.outcome { return o }
                s.waiter = c
                return nil
            }
            if let ready { c.resume(returning: ready) }
        }
    }
}
