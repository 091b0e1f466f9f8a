import Foundation
import Logging
import NIOCore
import NIOPosix
import Shared

/// The router's state: the routes of the running config, live output instances, work in flight,
/// and work waiting for an output.
///
/// A batch from ingest (one delivery: the batch for one destination) becomes one work item per
/// destination holding its messages (one per batch, or one per event; several items when the
/// messages exceed 1 MB), sent as one frame. Each item goes to an instance of the output kind that
/// serves it, is retried with backoff on a retryable nack (only its failed messages) or when its
/// instance goes away, and is finished when all its messages are delivered or failed for good.
/// When every item of a delivery is finished, ingest gets its `ack` (with the dead letters, if
/// any) and forgets it from its spool.
///
/// Order per user: items with a key (the MPID) stick to the instance that has that key's earlier
/// items in flight; only when none is in flight does the key go where rendezvous hashing over
/// the live instances puts it. So a change of the set of instances never lets a later batch of a
/// user overtake an earlier one, and a stable set keeps every user on one instance.
actor RouterCore {
    /// A delivery from ingest until all its work is finished.
    struct Progress {
        var ingest: FramePeer
        var remaining: Int
        var dead: [JSONValue] = []
    }

    struct Message {
        var payload: ByteBuffer
        /// The Keen collection (keen-out's topic); nil when the destination's own.
        var topic: String?
        /// Per-event messages: the event's id (the `sluice-event-id` header).
        var eventID: String?
    }

    struct Work {
        var batchID: UInt64
        var route: RouteID
        var destinationKey: String
        var role: PeerRole
        var spec: ByteBuffer
        var key: String?
        /// The batch's headers (every message gets them).
        var headers: [Header]?
        var messages: [Message]
        var bytes: Int
        /// The frame's payload and parts while every message is in it (the messages are slices
        /// of it); nil after a partial failure (the frame is packed again from what is left).
        var packed: (payload: ByteBuffer, parts: [Frame.Part])?
        var attempts = 0
        var peer: FramePeer?
        var sentAt = ContinuousClock.now
    }

    /// A tenant's destination as routed: its settings, and the wire key output processes know it by.
    struct Route {
        var destination: Destination
        var key: String
        var spec: ByteBuffer
        var generation: Int
        /// Removed by a reload: kept only to finish the backlog ingest still holds for it.
        var removed = false
    }

    struct RouteID: Hashable, Comparable {
        var tenant: String
        var destination: String
        static func < (a: RouteID, b: RouteID) -> Bool { (a.tenant, a.destination) < (b.tenant, b.destination) }
    }

    private struct Affinity: Hashable {
        var role: PeerRole
        var key: String
    }

    nonisolated let logger: Logger
    private var routes: [String: [String: Route]] = [:]
    private var outputs: [PeerRole: [FramePeer]] = [:]
    private var ingests: [FramePeer] = []
    private var sentSpecs: [UInt64: Set<String>] = [:]
    private var work: [UInt64: Work] = [:]
    private var progress: [UInt64: Progress] = [:]
    private var waiting: [PeerRole: [UInt64]] = [:]
    /// For each key with unfinished items: the instance they went to and how many there are.
    private var affinity: [Affinity: (peer: FramePeer?, count: Int)] = [:]
    private var nextID: UInt64 = 1
    private var roundRobin = 0
    private var stats: [RouteID: RouteStats] = [:]
    /// Unfinished work items per destination key.
    private var keyUse: [String: Int] = [:]
    /// Per tenant and destination: the first delivery refused because the backlog was full.
    private var refusedFirst: [RouteID: (id: UInt64, at: ContinuousClock.Instant)] = [:]
    let metrics = RouterMetrics()
    /// Re-reads the config file (used when ingest names a destination this router does not know yet:
    /// ingest may have reloaded a moment earlier).
    var refreshConfig: (@Sendable () async -> Void)?
    /// Work held at most (messages, and their bytes); beyond it ingest is told to retry later.
    /// 8 MB covers the outputs' round trips several times over at the rates measured (≈ 30 MB/s of
    /// messages, tens of milliseconds to a confirmation: docs/BENCHMARKS.md); a message's bytes
    /// are also in the frame being written, so more only grows the router's RSS (per event with 50
    /// tenants: 86 MB at 16 MB when every message had its own buffer, 67 MB once they were slices
    /// of their frame's payload).
    let maxBacklog: Int
    let maxBacklogBytes: Int
    private var backlogBytes = 0
    private var backlogMessages = 0
    /// A work item's messages at most (bytes, count): one frame to an output each.
    static let maxWorkBytes = 1 << 20
    static let maxWorkMessages = 500

    /// The router's state lives on one event loop: the one its frame connections and their
    /// readers run on (`EventLoopTaskExecutor`), so a frame reaches the core, and its answer the
    /// socket, without waking another thread.
    nonisolated let loop: EventLoop
    nonisolated var unownedExecutor: UnownedSerialExecutor { loop.executor.asUnownedSerialExecutor() }

    init(
        config: SluiceConfig, logger: Logger, maxBacklog: Int = 50_000, maxBacklogBytes: Int = 8 << 20,
        loop: EventLoop = MultiThreadedEventLoopGroup.singleton.next()
    ) {
        self.logger = logger
        self.loop = loop
        self.maxBacklog = maxBacklog
        self.maxBacklogBytes = maxBacklogBytes
        // An actor's init cannot call its methods; `install` is written for both uses.
        let (installed, _) = Self.install(config, over: [:], logger: logger)
        routes = installed
    }

    func setRefresh(_ refresh: @escaping @Sendable () async -> Void) { refreshConfig = refresh }

    // MARK: Config

    /// Applies a reloaded config: batches routed from now on use it; work already routed finishes
    /// with the settings it was routed under; a removed destination stays known (marked removed)
    /// so its backlog still drains.
    func apply(_ config: SluiceConfig) {
        let (installed, changes) = Self.install(config, over: routes, logger: logger)
        routes = installed
        if !changes.isEmpty {
            logger.notice("routes changed", metadata: ["changes": "\(changes.joined(separator: ", "))"])
        }
        announceOutputs()
        for key in Set(sentSpecs.values.flatMap { $0 }) { retireIfUnused(key) }
    }

    /// Tells the outputs to forget a destination key that no route uses any more and no work
    /// needs, so they can close what only it used (producers, connections).
    private func retireIfUnused(_ key: String) {
        guard keyUse[key] == nil else { return }
        let current = routes.values.contains { $0.values.contains { $0.key == key && !$0.removed } }
        guard !current else { return }
        var forget = Frame(type: .destination)
        forget.destination = key
        for peer in outputs.values.flatMap({ $0 }) where sentSpecs[peer.connectionID]?.contains(key) == true {
            peer.send(forget)
            sentSpecs[peer.connectionID]?.remove(key)
        }
    }

    private static func install(
        _ config: SluiceConfig, over old: [String: [String: Route]], logger: Logger
    ) -> ([String: [String: Route]], [String]) {
        var new: [String: [String: Route]] = [:]
        var changes: [String] = []
        for tenant in config.tenants {
            var table: [String: Route] = [:]
            for d in tenant.destinations {
                let previous = old[tenant.id]?[d.name]
                if let previous, previous.destination == d, !previous.removed {
                    table[d.name] = previous
                    continue
                }
                let generation = (previous?.generation ?? 0) + 1
                table[d.name] = Route(
                    destination: d, key: d.wireKey(tenant: tenant.id, generation: generation), spec: d.wireJSON.jsonBytes,
                    generation: generation)
                changes.append("\(tenant.id)/\(d.name) \(previous == nil ? "added" : "changed")")
                if case .kafka(let k) = d.kind, k.plaintext {
                    logger.warning(
                        "destination uses PLAINTEXT Kafka (development only: no encryption, no authentication)",
                        metadata: ["tenant.id": "\(tenant.id)", "destination": "\(d.name)"])
                }
            }
            new[tenant.id] = table
        }
        for (tenant, table) in old {
            for (name, var route) in table where new[tenant]?[name] == nil {
                if !route.removed { changes.append("\(tenant)/\(name) removed") }
                route.removed = true
                new[tenant, default: [:]][name] = route
            }
        }
        return (new, changes)
    }

    /// Every output kind the active routes need has a live instance.
    var outputsReady: Bool {
        let needed = Set(routes.values.flatMap { $0.values.filter { !$0.removed }.map(\.destination.role) })
        return needed.allSatisfy { !(outputs[$0] ?? []).isEmpty }
    }

    private func announceOutputs() {
        guard !ingests.isEmpty else { return }
        var frame = Frame(type: .outputs)
        frame.payload = JSONValue.object([
            .init("ready", .bool(outputsReady)),
            .init("outputs", .object(outputs.keys.sorted { $0.rawValue < $1.rawValue }.map { .init($0.rawValue, .number(String(outputs[$0]!.count))) })),
        ]).jsonBytes
        for ingest in ingests { ingest.send(frame) }
    }

    // MARK: Peers

    func register(_ peer: FramePeer) {
        guard let role = peer.role else { return }
        logger.info("peer connected", metadata: ["peer.role": "\(role.rawValue)", "peer.instance": "\(peer.instance ?? "")"])
        switch role {
        case .admin:
            return
        case .ingest:
            ingests.append(peer)
            announceOutputs()
            return
        case .kafkaOut, .keenOut:
            break
        }
        outputs[role, default: []].append(peer)
        metrics.outputs(role).set(Double(outputs[role]!.count))
        sentSpecs[peer.connectionID] = []
        announceOutputs()
        let queued = waiting[role] ?? []
        waiting[role] = []
        for id in queued { dispatch(id) }
    }

    func unregister(_ peer: FramePeer) {
        guard let role = peer.role else { return }
        switch role {
        case .admin:
            return
        case .ingest:
            logger.info("peer disconnected", metadata: ["peer.role": "ingest", "peer.instance": "\(peer.instance ?? "")"])
            ingests.removeAll { $0 == peer }
            return
        case .kafkaOut, .keenOut:
            break
        }
        logger.info("peer disconnected", metadata: ["peer.role": "\(role.rawValue)", "peer.instance": "\(peer.instance ?? "")"])
        outputs[role]?.removeAll { $0 == peer }
        metrics.outputs(role).set(Double(outputs[role]?.count ?? 0))
        sentSpecs[peer.connectionID] = nil
        for (k, v) in affinity where v.peer == peer { affinity[k]?.peer = nil }
        announceOutputs()
        // Whatever that instance had not confirmed goes to the others, oldest first, so each
        // user's items keep their order on the instance that takes them over.
        let orphaned = work.filter { $0.value.peer == peer }.keys.sorted()
        for id in orphaned {
            work[id]?.peer = nil
            dispatch(id)
        }
    }

    // MARK: Batches from ingest

    func accept(_ frame: Frame, from ingest: FramePeer) async {
        if progress[frame.id] != nil {
            // Sent again after a reconnect: already being worked on; answer on the new connection.
            progress[frame.id]?.ingest = ingest
            return
        }
        guard let tenant = frame.tenant, let payload = frame.payload else {
            ingest.send(.nack(frame.id, reason: "batch frame without tenant or payload", retryable: false))
            return
        }
        var targets: [Route]
        if let name = frame.destination {
            if routes[tenant]?[name] == nil, let refreshConfig {
                // ingest may have reloaded a newer config a moment before this router did.
                await refreshConfig()
                if progress[frame.id] != nil {
                    // Sent again while we waited: answer on the newest connection.
                    progress[frame.id]?.ingest = ingest
                    return
                }
            }
            guard let route = routes[tenant]?[name] else {
                ingest.send(.nack(frame.id, reason: "tenant '\(tenant)' has no destination '\(name)'", retryable: false))
                return
            }
            targets = [route]
        } else {
            targets = (routes[tenant] ?? [:]).values.filter { !$0.removed }.sorted { $0.destination.name < $1.destination.name }
            guard routes[tenant] != nil else {
                ingest.send(.nack(frame.id, reason: "unknown tenant '\(tenant)'", retryable: false))
                return
            }
        }
        // After a "backlog full" nack, later deliveries of that destination wait until ingest has
        // sent the refused one again: accepting them first would let them overtake it.
        let blockKey = RouteID(tenant: tenant, destination: frame.destination ?? "")
        if let blocked = refusedFirst[blockKey], frame.id > blocked.id, ContinuousClock.now - blocked.at < .seconds(5) {
            // (ingest sends the refused one again within ~200 ms; if it never comes — it may have
            // been dead-lettered meanwhile — the block lapses rather than stall the destination.)
            ingest.send(.nack(frame.id, reason: "router backlog is full", retryable: true))
            return
        }
        guard hasRoom(for: targets.map { RouteID(tenant: tenant, destination: $0.destination.name) }, bytes: payload.readableBytes)
        else {
            if refusedFirst[blockKey].map({ frame.id < $0.id || ContinuousClock.now - $0.at >= .seconds(5) }) ?? true {
                refusedFirst[blockKey] = (frame.id, ContinuousClock.now)
            }
            ingest.send(.nack(frame.id, reason: "router backlog is full", retryable: true))
            return
        }
        if refusedFirst[blockKey]?.id == frame.id || refusedFirst[blockKey].map({ ContinuousClock.now - $0.at >= .seconds(5) }) == true {
            refusedFirst[blockKey] = nil
        }
        metrics.batchesReceived.increment()
        let receivedAt = Int64(Date().timeIntervalSince1970 * 1000)
        var tree: JSONValue?
        var items: [Work] = []
        var dead: [JSONValue] = []
        for route in targets {
            var messages: [ByteBuffer] = []
            var packedMessages: ByteBuffer?
            var topics: [String] = []
            var eventIDs: [String] = []
            let id = RouteID(tenant: tenant, destination: route.destination.name)
            switch route.destination.kind {
            case .keen(let keen):
                if tree == nil {
                    do {
                        tree = try JSONValue.parse(payload)
                    } catch {
                        ingest.send(.nack(frame.id, reason: "the batch is not valid JSON: \(error)", retryable: false))
                        return
                    }
                }
                let batchID = frame.headers?.first { $0.name == "sluice-batch-id" }?.value
                let output = keen.events(from: tree!, batchID: batchID, receivedAt: receivedAt)
                messages = output.events.map(\.payload)
                topics = output.events.map(\.collection)
                eventIDs = output.events.map(\.eventID)
                if !output.rejected.isEmpty {
                    // Keen would refuse (or silently skip) these: never sent, reported with the reason.
                    let reason = output.rejected.map(\.reason).joined(separator: "; ")
                    logger.error(
                        "events refused for Keen; dead-lettered",
                        metadata: ["tenant.id": "\(tenant)", "destination": "\(route.destination.name)", "error": "\(reason)"])
                    stats[id, default: RouteStats()].failed(reason, at: Date())
                    stats[id]?.deadLettered += output.rejected.count
                    metrics.messages(.keenOut, "dead_lettered").increment(by: Int64(output.rejected.count))
                    dead.append(
                        .object([
                            .init("destination", .string(route.destination.name)), .init("reason", .string(reason)),
                            .init("attempts", .number("0")),
                        ]))
                }
            case .kafka(let kafka):
                // Spliced from the batch's bytes: nothing untouched is parsed into values or rewritten.
                let output: KafkaBatchOutput
                do {
                    output = try kafka.settings.splice(payload, receivedAt: receivedAt)
                } catch {
                    ingest.send(.nack(frame.id, reason: "the batch is not valid JSON: \(error)", retryable: false))
                    return
                }
                metrics.eventsUnsupported.increment(by: Int64(output.unsupportedEvents))
                metrics.eventsFiltered.increment(by: Int64(output.filteredEvents))
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
                packedMessages = output.packed
            }
            // One work item (one frame) per destination, cut where the messages exceed 1 MB.
            var group: [Message] = []
            var groupBytes = 0
            func close() {
                guard !group.isEmpty else { return }
                var packed: (payload: ByteBuffer, parts: [Frame.Part])?
                if group.count > 1, group.count == messages.count, let all = packedMessages {
                    // All of them, already one array (the splice's): the frame's payload as it is.
                    packed = (all, group.map { Frame.Part(bytes: $0.payload.readableBytes, topic: $0.topic, eventID: $0.eventID) })
                } else if group.count > 1 {
                    // Packed once; the messages are kept as slices of the frame's payload.
                    let (payload, parts) = Frame.pack(group.map { ($0.payload, $0.topic, $0.eventID) })
                    for (i, slice) in Frame.slices(of: payload, parts).enumerated() { group[i].payload = slice }
                    packed = (payload, parts)
                } else if group[0].payload.storageCapacity > 2 * group[0].payload.readableBytes {
                    // A slice of something larger (per event, the splice cuts all of a batch's
                    // messages from one buffer): kept alone it would pin bytes the backlog does
                    // not count. Copied.
                    group[0].payload = ByteBuffer(bytes: group[0].payload.readableBytesView)
                }
                items.append(
                    Work(
                        batchID: frame.id, route: id, destinationKey: route.key, role: route.destination.role,
                        spec: route.spec, key: frame.key, headers: frame.headers, messages: group, bytes: groupBytes,
                        packed: packed))
                group = []
                groupBytes = 0
            }
            for (i, message) in messages.enumerated() {
                if groupBytes + message.readableBytes > Self.maxWorkBytes || group.count == Self.maxWorkMessages { close() }
                group.append(
                    Message(payload: message, topic: i < topics.count ? topics[i] : nil, eventID: i < eventIDs.count ? eventIDs[i] : nil))
                groupBytes += message.readableBytes
            }
            close()
        }
        guard !items.isEmpty else {
            // Nothing to send anywhere (or all of it refused).
            var ack = Frame.ack(frame.id)
            if !dead.isEmpty { ack.payload = JSONValue.object([.init("dead", .array(dead))]).jsonBytes }
            ingest.send(ack)
            return
        }
        progress[frame.id] = Progress(ingest: ingest, remaining: items.count, dead: dead)
        for item in items {
            let id = nextID
            nextID += 1
            work[id] = item
            backlogBytes += item.bytes
            backlogMessages += item.messages.count
            stats[item.route, default: RouteStats()].backlog += item.messages.count
            stats[item.route]!.bytes += item.bytes
            keyUse[item.destinationKey, default: 0] += 1
            metrics.backlog(item.role).increment(by: Double(item.messages.count))
            if let key = item.key { affinity[Affinity(role: item.role, key: key), default: (nil, 0)].count += 1 }
            dispatch(id)
        }
    }

    /// Whether the backlog can take a delivery of `bytes` for `routes`. Within its bounds, always;
    /// beyond them, only for destinations that hold less than their share (the bounds divided
    /// among the destinations with work here): destinations that are down fill only their own
    /// share, and the others keep flowing.
    private func hasRoom(for routes: [RouteID], bytes: Int) -> Bool {
        if backlogMessages + routes.count <= maxBacklog && backlogBytes + bytes * routes.count <= maxBacklogBytes { return true }
        let holding = stats.values.reduce(0) { $0 + ($1.backlog > 0 ? 1 : 0) }
        return routes.allSatisfy { route in
            let s = stats[route] ?? RouteStats()
            let sharers = max(1, holding + (s.backlog > 0 ? 0 : 1))
            return s.backlog + 1 <= maxBacklog / sharers && s.bytes + bytes <= maxBacklogBytes / sharers
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
            let a = Affinity(role: item.role, key: key)
            if let held = affinity[a]?.peer {
                peer = held
            } else {
                peer = Self.rendezvous(key, peers)
                affinity[a, default: (nil, 1)].peer = peer
            }
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
        item.sentAt = .now
        work[id] = item
        var frame: Frame
        if item.messages.count == 1, let m = item.messages.first {
            frame = Frame(type: .batch, id: id)
            frame.topic = m.topic
            frame.payload = m.payload
            frame.headers = item.headers
            if let eventID = m.eventID { frame.headers = (item.headers ?? []) + [Header("sluice-event-id", eventID)] }
        } else {
            frame = Frame(type: .batch, id: id)
            (frame.payload, frame.parts) = item.packed ?? Frame.pack(item.messages.map { ($0.payload, $0.topic, $0.eventID) })
            frame.headers = item.headers
        }
        frame.tenant = item.route.tenant
        frame.destination = item.destinationKey
        frame.key = item.key
        peer.send(frame)
    }

    /// Highest-random-weight hashing on the instance names: a stable set sends a key to one
    /// instance; adding or removing an instance moves only the keys that must move.
    static func rendezvous(_ key: String, _ peers: [FramePeer]) -> FramePeer {
        var best = peers[0]
        var bestScore: UInt64 = 0
        for (i, p) in peers.enumerated() {
            var h = StableHash()
            h.combine(p.instance ?? "")
            h.combine("\u{0}")
            h.combine(key)
            let score = StableHash.mix(h.value)
            if i == 0 || score > bestScore {
                best = p
                bestScore = score
            }
        }
        return best
    }

    // MARK: Outcomes from outputs

    func outcome(_ frame: Frame, from peer: FramePeer) {
        guard let item = work[frame.id], item.peer == peer else { return }  // stale: already re-dispatched
        metrics.deliveryDuration(item.role).record(ContinuousClock.now - item.sentAt)
        let count = item.messages.count
        if frame.type == .ack {
            metrics.messages(item.role, "delivered").increment(by: Int64(count))
            stats[item.route, default: RouteStats()].delivered(count, at: Date())
            finish(frame.id, deadLetter: nil)
            return
        }
        // Which messages failed: those the nack lists (a frame of several), else all of them.
        let whole = { (i: Int) in FailedPart(index: i, reason: frame.reason ?? "no reason given", retryable: frame.retryable == true) }
        var failed = (count > 1 ? frame.failedParts : nil) ?? item.messages.indices.map(whole)
        var seen = Set<Int>()
        failed = failed.filter { item.messages.indices.contains($0.index) && seen.insert($0.index).inserted }
        if failed.isEmpty { failed = item.messages.indices.map(whole) }
        let delivered = count - failed.count
        if delivered > 0 {
            metrics.messages(item.role, "delivered").increment(by: Int64(delivered))
            stats[item.route, default: RouteStats()].delivered(delivered, at: Date())
        }
        let retryable = failed.filter(\.retryable)
        let permanent = failed.filter { !$0.retryable }
        stats[item.route, default: RouteStats()].failed(failed[0].reason, at: Date())
        var deadLetter: JSONValue?
        if !permanent.isEmpty {
            // Permanent failure: ingest keeps the batch as a dead letter for this destination.
            let reasons = Self.distinct(permanent.map(\.reason))
            let reason = count > 1 ? "\(permanent.count) of \(count) messages: \(reasons)" : reasons
            metrics.messages(item.role, "dead_lettered").increment(by: Int64(permanent.count))
            stats[item.route]?.deadLettered += permanent.count
            logger.error(
                "delivery failed permanently; dead-lettered",
                metadata: ["tenant.id": "\(item.route.tenant)", "destination": "\(item.route.destination)", "error": "\(reason)"])
            deadLetter = .object([
                .init("destination", .string(item.route.destination)), .init("reason", .string(reason)),
                .init("attempts", .number(String(item.attempts))),
            ])
        }
        guard !retryable.isEmpty else {
            finish(frame.id, deadLetter: deadLetter)
            return
        }
        if let deadLetter { progress[item.batchID]?.dead.append(deadLetter) }
        // Only the messages that failed go again.
        if retryable.count < count { keep(retryable.map(\.index), of: frame.id) }
        metrics.messages(item.role, "retried").increment(by: Int64(retryable.count))
        stats[item.route]?.retried += retryable.count
        work[frame.id]?.peer = nil
        let delay = Self.backoff(attempt: item.attempts)
        logger.warning(
            "delivery failed, will retry",
            metadata: [
                "tenant.id": "\(item.route.tenant)", "destination": "\(item.route.destination)",
                "error": "\(Self.distinct(retryable.map(\.reason)))", "messages": "\(retryable.count)",
                "attempt": "\(item.attempts)", "retry.in_ms": "\(delay.components.seconds * 1000 + delay.components.attoseconds / 1_000_000_000_000_000)",
            ])
        Task { [weak self] in
            try? await Task.sleep(for: delay)
            await self?.retry(frame.id)
        }
    }

    private static func distinct(_ reasons: [String]) -> String {
        var seen = Set<String>()
        return reasons.filter { seen.insert($0).inserted }.joined(separator: "; ")
    }

    /// Keeps only the messages at `indices` of a work item (the others are settled).
    private func keep(_ indices: [Int], of id: UInt64) {
        guard var item = work[id] else { return }
        let kept = indices.sorted().map { item.messages[$0] }
        let bytes = kept.reduce(0) { $0 + $1.payload.readableBytes }
        let settled = item.messages.count - kept.count
        backlogBytes -= item.bytes - bytes
        backlogMessages -= settled
        stats[item.route]?.backlog -= settled
        stats[item.route]?.bytes -= item.bytes - bytes
        metrics.backlog(item.role).decrement(by: Double(settled))
        item.messages = kept
        item.bytes = bytes
        item.packed = nil
        work[id] = item
    }

    /// An output's client-level error for a destination: shown by `status` as its last error.
    func noteError(destinationKey key: String, _ text: String) {
        for (tenant, table) in routes {
            for (name, route) in table where route.key == key {
                stats[RouteID(tenant: tenant, destination: name), default: RouteStats()].failed(text, at: Date())
            }
        }
    }

    private func finish(_ id: UInt64, deadLetter: JSONValue?) {
        guard let item = work.removeValue(forKey: id) else { return }
        backlogBytes -= item.bytes
        backlogMessages -= item.messages.count
        stats[item.route]?.backlog -= item.messages.count
        stats[item.route]?.bytes -= item.bytes
        metrics.backlog(item.role).decrement(by: Double(item.messages.count))
        if let n = keyUse[item.destinationKey], n > 1 {
            keyUse[item.destinationKey] = n - 1
        } else {
            keyUse[item.destinationKey] = nil
            retireIfUnused(item.destinationKey)
        }
        if let key = item.key {
            let a = Affinity(role: item.role, key: key)
            if let held = affinity[a], held.count > 1 { affinity[a]!.count -= 1 } else { affinity[a] = nil }
        }
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

    /// Messages routed and not yet settled (for tests and status).
    var backlog: Int { backlogMessages }

    // MARK: Status

    /// What `ingest status` shows of the router: outputs, and per tenant and destination what was
    /// delivered, how fast, what is waiting, and the last error.
    func status(config: ConfigWatcher.Status?) -> JSONValue {
        let now = Date()
        var instances: [JSONValue] = []
        for role in outputs.keys.sorted(by: { $0.rawValue < $1.rawValue }) {
            for p in outputs[role]! {
                let inFlight = work.values.reduce(0) { $0 + ($1.peer == p ? $1.messages.count : 0) }
                instances.append(
                    .object([
                        .init("role", .string(role.rawValue)), .init("instance", .string(p.instance ?? "")),
                        .init("in_flight", .number(String(inFlight))),
                    ]))
            }
        }
        var destinations: [JSONValue] = []
        for tenant in routes.keys.sorted() {
            for name in routes[tenant]!.keys.sorted() {
                let route = routes[tenant]![name]!
                let s = stats[RouteID(tenant: tenant, destination: name)] ?? RouteStats()
                var members: [JSONValue.Member] = [
                    .init("tenant", .string(tenant)), .init("destination", .string(name)),
                    .init("kind", .string(route.destination.kindName)),
                    .init("state", .string(route.removed ? "removed" : "active")),
                    .init("generation", .number(String(route.generation))),
                    .init("delivered", .number(String(s.delivered))),
                    .init("delivered_per_second", .number(String(format: "%.1f", s.rate.perSecond(at: now)))),
                    .init("retried", .number(String(s.retried))),
                    .init("dead_lettered", .number(String(s.deadLettered))),
                    .init("in_router", .number(String(s.backlog))),
                ]
                if let e = s.lastError {
                    members.append(.init("last_error", .string(e)))
                    members.append(.init("last_error_at", .string(ISO8601DateFormatter().string(from: s.lastErrorAt!))))
                }
                destinations.append(.object(members))
            }
        }
        var configMembers: [JSONValue.Member] = []
        if let config {
            configMembers = [
                .init("generation", .number(String(config.generation))),
                .init("loaded_at", .string(ISO8601DateFormatter().string(from: config.loadedAt))),
            ]
            if let e = config.lastError {
                configMembers.append(.init("last_error", .string(e)))
                configMembers.append(.init("last_error_at", .string(ISO8601DateFormatter().string(from: config.lastErrorAt!))))
            }
        }
        return .object([
            .init("ingest_connected", .bool(!ingests.isEmpty)),
            .init("outputs_ready", .bool(outputsReady)),
            .init("outputs", .array(instances)),
            .init("config", .object(configMembers)),
            .init("destinations", .array(destinations)),
        ])
    }
}

/// What the router counts for one tenant's destination, for `status`.
struct RouteStats {
    var delivered = 0
    var retried = 0
    var deadLettered = 0
    /// Messages in the router, and their bytes.
    var backlog = 0
    var bytes = 0
    var lastError: String?
    var lastErrorAt: Date?
    var rate = RateMeter()

    mutating func delivered(_ n: Int, at now: Date) {
        delivered += n
        rate.add(n, at: now)
    }

    mutating func failed(_ reason: String, at now: Date) {
        lastError = reason
        lastErrorAt = now
    }
}

/// Events per second over the last ten whole seconds.
struct RateMeter {
    private var buckets = [Int](repeating: 0, count: 11)
    private var second = 0

    mutating func add(_ n: Int, at now: Date) {
        advance(to: Int(now.timeIntervalSince1970))
        buckets[second % buckets.count] += n
    }

    mutating func advance(to s: Int) {
        guard s > second else { return }
        for t in (max(second, s - buckets.count) + 1)...s { buckets[t % buckets.count] = 0 }
        second = s
    }

    /// The rate over the ten seconds before the current one.
    func perSecond(at now: Date) -> Double {
        let s = Int(now.timeIntervalSince1970)
        var total = 0
        for t in (s - 10)..<s where t > second - buckets.count && t <= second { total += buckets[t % buckets.count] }
        return Double(total) / 10
    }
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

    /// A finalizer (splitmix64's) so every bit of the score depends on every input byte: FNV's
    /// high bits barely move when only the last bytes differ.
    static func mix(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9e37_79b9_7f4a_7c15
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
