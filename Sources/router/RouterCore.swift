import Foundation
import Logging
import NIOCore
import Shared

/// The router's state: live output instances, work in flight, and work waiting for an output.
///
/// A batch from ingest becomes one work item per message per destination. Each item goes to an
/// instance of the output kind that serves it (by the batch's key, so one user's batches take one
/// path), is retried with backoff on a retryable nack or when its instance goes away, and is
/// finished on an ack or a permanent failure. When every item of a batch is finished, ingest gets
/// the batch's `ack` (with the destinations that dead-lettered it) and forgets it from its spool.
actor RouterCore {
    /// A batch from ingest until all its work is finished.
    struct Progress {
        var ingest: FramePeer
        var remaining: Int
        var dead: [JSONValue] = []
    }

    struct Work {
        var batchID: UInt64
        var tenant: String
        var destination: String
        var destinationKey: String
        var role: PeerRole
        var spec: ByteBuffer
        var key: String?
        var headers: [Header]?
        var payload: ByteBuffer
        var attempts = 0
        var peer: FramePeer?
    }

    nonisolated let logger: Logger
    private var config: SluiceConfig
    /// Per tenant: its destinations with their wire keys and settings payloads, computed once.
    private var routes: [String: [(destination: Destination, key: String, spec: ByteBuffer)]] = [:]
    private var outputs: [PeerRole: [FramePeer]] = [:]
    private var sentSpecs: [UInt64: Set<String>] = [:]
    private var work: [UInt64: Work] = [:]
    private var progress: [UInt64: Progress] = [:]
    private var waiting: [PeerRole: [UInt64]] = [:]
    private var nextID: UInt64 = 1
    private var roundRobin = 0
    /// Work held at most (items and payload bytes); beyond it ingest is told to retry later (503).
    let maxBacklog: Int
    let maxBacklogBytes: Int
    private var backlogBytes = 0

    init(config: SluiceConfig, logger: Logger, maxBacklog: Int = 100_000, maxBacklogBytes: Int = 64 << 20) {
        self.config = config
        self.logger = logger
        self.maxBacklog = maxBacklog
        self.maxBacklogBytes = maxBacklogBytes
        for tenant in config.tenants {
            routes[tenant.id] = tenant.destinations.map { d in
                (d, d.wireKey(tenant: tenant.id, generation: 1), d.wireJSON.jsonBytes)
            }
            for d in tenant.destinations {
                if case .kafka(let k) = d.kind, k.plaintext {
                    logger.warning(
                        "destination uses PLAINTEXT Kafka (development only: no encryption, no authentication)",
                        metadata: ["tenant.id": "\(tenant.id)", "destination": "\(d.name)"])
                }
            }
        }
    }

    // MARK: Peers

    func register(_ peer: FramePeer) {
        guard let role = peer.role else { return }
        logger.info("peer connected", metadata: ["peer.role": "\(role.rawValue)", "peer.instance": "\(peer.instance ?? "")"])
        guard role != .ingest else { return }
        outputs[role, default: []].append(peer)
        sentSpecs[peer.connectionID] = []
        let queued = waiting[role] ?? []
        waiting[role] = []
        for id in queued { dispatch(id) }
    }

    func unregister(_ peer: FramePeer) {
        guard let role = peer.role else { return }
        logger.info("peer disconnected", metadata: ["peer.role": "\(role.rawValue)", "peer.instance": "\(peer.instance ?? "")"])
        guard role != .ingest else { return }
        outputs[role]?.removeAll { $0 == peer }
        sentSpecs[peer.connectionID] = nil
        // Whatever that instance had not confirmed goes to the others.
        let orphaned = work.filter { $0.value.peer == peer }.keys.sorted()
        for id in orphaned {
            work[id]?.peer = nil
            dispatch(id)
        }
    }

    // MARK: Batches from ingest

    func accept(_ frame: Frame, from ingest: FramePeer) {
        if progress[frame.id] != nil {
            // Sent again after a reconnect: already being worked on; answer on the new connection.
            progress[frame.id]?.ingest = ingest
            return
        }
        guard let tenant = frame.tenant, let payload = frame.payload else {
            ingest.send(.nack(frame.id, reason: "batch frame without tenant or payload", retryable: false))
            return
        }
        guard var destinations = routes[tenant] else {
            ingest.send(.nack(frame.id, reason: "unknown tenant '\(tenant)'", retryable: false))
            return
        }
        if let only = frame.destination {
            // A replayed dead letter: for that one destination, under its current settings.
            destinations = destinations.filter { $0.destination.name == only }
            guard !destinations.isEmpty else {
                ingest.send(.nack(frame.id, reason: "tenant '\(tenant)' has no destination '\(only)'", retryable: false))
                return
            }
        }
        let bytes = payload.readableBytes * destinations.count
        guard work.count + destinations.count <= maxBacklog, backlogBytes + bytes <= maxBacklogBytes else {
            ingest.send(.nack(frame.id, reason: "router backlog is full", retryable: true))
            return
        }
        let receivedAt = Int64(Date().timeIntervalSince1970 * 1000)
        var tree: JSONValue?
        var items: [Work] = []
        for route in destinations {
            let messages: [ByteBuffer]
            var eventIDs: [String] = []
            switch route.destination.kind {
            case .kafka(let kafka):
                if tree == nil {
                    do {
                        tree = try JSONValue.parse(payload)
                    } catch {
                        ingest.send(.nack(frame.id, reason: "the batch is not valid JSON: \(error)", retryable: false))
                        return
                    }
                }
                let output = kafka.settings.apply(to: tree!, original: payload, receivedAt: receivedAt)
                if output.unsupportedEvents + output.filteredEvents > 0 || output.messages.isEmpty {
                    logger.debug(
                        "connection settings applied",
                        metadata: [
                            "tenant.id": "\(tenant)", "destination": "\(route.destination.name)",
                            "events.unsupported": "\(output.unsupportedEvents)", "events.filtered": "\(output.filteredEvents)",
                            "messages": "\(output.messages.count)",
                        ])
                }
                messages = output.messages
                eventIDs = output.eventIDs
            }
            for (i, message) in messages.enumerated() {
                var headers = frame.headers ?? []
                if i < eventIDs.count { headers.append(Header("sluice-event-id", eventIDs[i])) }
                items.append(
                    Work(
                        batchID: frame.id, tenant: tenant, destination: route.destination.name, destinationKey: route.key,
                        role: route.destination.role, spec: route.spec, key: frame.key, headers: headers.isEmpty ? nil : headers,
                        payload: message))
            }
        }
        guard !items.isEmpty else {
            ingest.send(.ack(frame.id))  // nothing to send anywhere
            return
        }
        progress[frame.id] = Progress(ingest: ingest, remaining: items.count)
        for item in items {
            let id = nextID
            nextID += 1
            work[id] = item
            backlogBytes += item.payload.readableBytes
            dispatch(id)
        }
    }

    private func dispatch(_ id: UInt64) {
        guard var item = work[id] else { return }
        guard let peers = outputs[item.role], !peers.isEmpty else {
            waiting[item.role, default: []].append(id)
            return
        }
        let peer: FramePeer
        if let key = item.key {
            var hasher = StableHash()
            hasher.combine(key)
            peer = peers[Int(hasher.value % UInt64(peers.count))]
        } else {
            roundRobin &+= 1
            peer = peers[roundRobin % peers.count]
        }
        if sentSpecs[peer.connectionID]?.contains(item.destinationKey) != true {
            var spec = Frame(type: .destination)
            spec.destination = item.destinationKey
            spec.payload = item.spec
            peer.send(spec)
            sentSpecs[peer.connectionID, default: []].insert(item.destinationKey)
        }
        item.peer = peer
        item.attempts += 1
        work[id] = item
        var frame = Frame(type: .batch, id: id)
        frame.tenant = item.tenant
        frame.destination = item.destinationKey
        frame.key = item.key
        frame.headers = item.headers
        frame.payload = item.payload
        peer.send(frame)
    }

    // MARK: Outcomes from outputs

    func outcome(_ frame: Frame, from peer: FramePeer) {
        guard let item = work[frame.id], item.peer == peer else { return }  // stale: already re-dispatched
        if frame.type == .ack {
            finish(frame.id, deadLetter: nil)
            return
        }
        let reason = frame.reason ?? "no reason given"
        if frame.retryable == true {
            work[frame.id]?.peer = nil
            let delay = Self.backoff(attempt: item.attempts)
            logger.warning(
                "delivery failed, will retry",
                metadata: [
                    "tenant.id": "\(item.tenant)", "destination": "\(item.destination)", "error": "\(reason)",
                    "attempt": "\(item.attempts)", "retry.in_ms": "\(delay.components.seconds * 1000 + delay.components.attoseconds / 1_000_000_000_000_000)",
                ])
            Task { [weak self] in
                try? await Task.sleep(for: delay)
                await self?.retry(frame.id)
            }
        } else {
            // Permanent failure: ingest keeps the batch as a dead letter for this destination.
            logger.error(
                "delivery failed permanently; dead-lettered",
                metadata: ["tenant.id": "\(item.tenant)", "destination": "\(item.destination)", "error": "\(reason)"])
            finish(
                frame.id,
                deadLetter: .object([
                    .init("destination", .string(item.destination)), .init("reason", .string(reason)),
                    .init("attempts", .number(String(item.attempts))),
                ]))
        }
    }

    private func finish(_ id: UInt64, deadLetter: JSONValue?) {
        guard let item = work.removeValue(forKey: id) else { return }
        backlogBytes -= item.payload.readableBytes
        guard var p = progress[item.batchID] else { return }
        p.remaining -= 1
        if let deadLetter { p.dead.append(deadLetter) }
        guard p.remaining == 0 else {
            progress[item.batchID] = p
            return
        }
        progress[item.batchID] = nil
        var ack = Frame.ack(item.batchID)
        if !p.dead.isEmpty { ack.payload = JSONValue.object([.init("dead", .array(p.dead))]).jsonBytes }
        p.ingest.send(ack)
    }

    private func retry(_ id: UInt64) {
        guard let item = work[id], item.peer == nil else { return }
        if waiting[item.role]?.contains(id) == true { return }
        dispatch(id)
    }

    /// Exponential backoff with jitter: 200 ms doubling to 30 s.
    static func backoff(attempt: Int) -> Duration {
        let base = min(200.0 * pow2(attempt - 1), 30_000)
        return .milliseconds(Int(base * Double.random(in: 0.5...1.0)))
    }

    private static func pow2(_ n: Int) -> Double { n <= 0 ? 1 : Double(1 << min(n, 20)) }

    /// For tests and status.
    var backlog: Int { work.count }
}

/// FNV-1a: stable across processes and runs (Swift's Hasher is seeded per process).
struct StableHash {
    var value: UInt64 = 0xcbf2_9ce4_8422_2325
    mutating func combine(_ s: String) {
        for b in s.utf8 {
            value ^= UInt64(b)
            value &*= 0x100_0000_01b3
        }
    }
}
