import Dispatch
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Shared

/// What ingest does with validated batches: stores them and reports whether they were taken.
protocol BatchSink: Sendable {
    /// Whether batches can be taken now (for `/readyz`).
    var isReady: Bool { get }
    /// Stores the batches; `completion` is called once with the outcome, on any thread.
    func submit(tenant: String, batches: [ValidatedBatch], completion: @escaping @Sendable (SubmitOutcome) -> Void)
}

enum SubmitOutcome: Equatable, Sendable {
    /// Every batch was stored durably.
    case accepted
    /// No room to store the batches: try again after `retryAfter` seconds (429).
    case full(retryAfter: Int)
    /// Cannot store right now (503).
    case unavailable(String)
}

/// The durable path: a batch is stored in the spool (fsync'd), with a delivery for each of its
/// tenant's destinations, before the client hears 202; then it is fed to the router.
struct SpoolingSink: BatchSink {
    let spool: Spool
    let link: RouterLink
    let tenants: Tenants
    let logger: Logger

    /// Ready: the router is connected and has an instance of every output kind the config needs,
    /// and the spool has room.
    var isReady: Bool { link.isConnected && link.outputsReady && !spool.isFull }

    func submit(tenant: String, batches: [ValidatedBatch], completion: @escaping @Sendable (SubmitOutcome) -> Void) {
        let destinations = tenants.destinations(of: tenant)
        spool.append(tenant: tenant, destinations: destinations, batches: batches) { [link, logger] result in
            switch result {
            case .success:
                let targets = destinations.map { DeliveryTarget(tenant: tenant, destination: $0) }
                link.pump(targets)
                link.gate.answer(for: targets) { completion(.accepted) }
            case .failure(Spool.Failure.full):
                completion(.full(retryAfter: 5))
            case .failure(let error):
                logger.error("cannot write to the spool", metadata: ["error": "\(error)"])
                completion(.unavailable("the spool cannot be written"))
            }
        }
    }
}

/// Feeds the spool to the router over one connection, destination by destination: each
/// destination's deliveries go in order, at most `window` unfinished at a time and at most
/// `windowBytes` of batch bytes (at least one), so a destination that is down holds only its own
/// window and the others keep flowing, and what the router holds stays bounded per destination
/// (128 × 11 KB ≈ 1.4 MB for typical batches: with 256 and no byte bound, 50 destinations in
/// per-event mode took the router to 357 MB), and all destinations together share the link's
/// window (`LinkWindow`), so what the router is sent stays near what it can hold. A delivery is forgotten
/// only when the router reports that its destination has the batch (`ack`) or never will (a
/// dead letter). After a reconnect (router or ingest restarted) everything unfinished is sent
/// again: the router ignores what it is already working on, so only work a crashed router had not
/// finished can reach a destination twice.
///
/// The window is what one destination can deliver per round trip: with 64, one tenant sending
/// batches at max load delivered 151–153k events/s of the ≈ 190k ingest accepted (the rest piled
/// up in the spool and were read back); with 128, 202–206k, and ingest's CPU per request 30%
/// lower (docs/BENCHMARKS.md, session 15).
final class RouterLink: FrameConnectionHandler {
    private struct Lane {
        var inFlight: Set<Int64> = []
        var inFlightBytes = 0
        /// The highest delivery id sent on this connection.
        var cursor: Int64 = 0
        var pausedUntil: ContinuousClock.Instant?
        /// How many may be unfinished now, as TCP keeps its congestion window: halved when the
        /// router refuses one for lack of room, then grown by one per window's worth of acks
        /// up to the link's `window`. Without it a
        /// destination kept its whole window in flight however full the router was: per event
        /// with 50 tenants at max load, a quarter of all deliveries sent were refused and read
        /// back from the spool to be sent again, and the churn took ingest's RSS from 45 to
        /// 65–115 MB.
        var window: Int
        var acked = 0
        /// When the router last answered one of this destination's deliveries with an ack.
        var lastAck: ContinuousClock.Instant?
        /// When the window was last cut: the refusals of what was in flight then (the router
        /// refuses everything after a refused delivery until it comes again) arrive within the
        /// pause that follows, and count as one.
        var cutAt: ContinuousClock.Instant?
        init(window: Int) { self.window = window }

        mutating func grow(upTo limit: Int) {
            guard window < limit else { return }
            acked += 1
            if acked >= window {
                window += 1
                acked = 0
            }
        }

        /// The router refused one of its deliveries for lack of room: halves the window, once per
        /// burst of refusals (`cutAt`).
        mutating func refused(at now: ContinuousClock.Instant, pause: Duration) {
            guard cutAt.map({ now - $0 >= pause }) ?? true else { return }
            cutAt = now
            window = max(1, window / 2)
            acked = 0
        }
    }

    /// The link's window over all destinations, in batch bytes, kept like a lane's: halved (to no
    /// less than `minimum`) when the router refuses for lack of room — once per burst —, then grown
    /// by an eighth for each window's worth of bytes acked, up to `maximum` (`totalWindowBytes`:
    /// 6 MB, under the router's backlog bound of 8 MB; what is in flight is held in ingest's memory
    /// too, in buffers up to twice the batch's size — with 8 MB ingest's peak RSS at max with
    /// batches for 50 tenants was ≈ 4 MB higher, throughput the same: docs/BENCHMARKS.md, session
    /// 15). The lanes' windows alone let 50 destinations hold up to
    /// 50 × 128 batches in flight, many times what the router takes (8 MB of messages; per event
    /// a batch's messages take 2–3× its bytes), each destination probing on its own: per event
    /// with 50 tenants at max load the router refused 90–150 deliveries a second, each read back
    /// from the spool and sent again, and ingest's peak RSS was 58–97 MB (docs/BENCHMARKS.md,
    /// session 11).
    ///
    /// Near the size it was refused at it grows by a sixty-fourth instead (as CUBIC slows near its
    /// last maximum): per event with 50 tenants the router holds less than 6 MB of batches (their
    /// messages take 2–3× their bytes), and growing by an eighth up to the refusal and past it made
    /// the link refused several times a second — each refusal pausing a destination and sending its
    /// refused deliveries again, read back from the spool.
    struct LinkWindow {
        let maximum: Int
        let minimum: Int
        private(set) var bytes: Int
        /// The window when the router last refused.
        private var ceiling: Int
        private var acked = 0
        private var cutAt: ContinuousClock.Instant?

        init(maximum: Int) {
            self.maximum = maximum
            minimum = max(1, min(1 << 20, maximum / 8))
            bytes = maximum
            ceiling = maximum
        }

        mutating func refused(at now: ContinuousClock.Instant, pause: Duration) {
            guard cutAt.map({ now - $0 >= pause }) ?? true else { return }
            cutAt = now
            ceiling = bytes
            bytes = max(minimum, bytes / 2)
            acked = 0
        }

        mutating func acked(_ count: Int) {
            guard bytes < maximum else { return }
            acked += count
            if acked >= bytes {
                let step = bytes < ceiling - ceiling / 8 ? bytes / 8 : bytes / 64
                bytes = min(maximum, bytes + max(1, step))
                acked = 0
            }
        }
    }

    private struct State {
        var peer: FramePeer?
        var lanes: [DeliveryTarget: Lane] = [:]
        var owner: [Int64: (target: DeliveryTarget, bytes: Int)] = [:]
        var pumping = false
        /// Destinations that may have something to send: the next pass looks at these only.
        var dirty: Set<DeliveryTarget> = []
        /// The next pass looks at every destination.
        var allDirty = false
        var fullPump = false
        /// A lane needs the spool read (it is below its in-memory floor): the next pass runs on the
        /// pump's queue.
        var readPump = false
        /// What the router last said about its outputs.
        var outputsReady = false
        /// Batch bytes sent and unfinished, all destinations together (see `room`).
        var inFlightBytes = 0
        var link: LinkWindow
        /// Destinations that waited for byte room (in their own window or the link's): pumped
        /// when answers come.
        var starved: Set<DeliveryTarget> = []

        mutating func reset(peer: FramePeer?) {
            self.peer = peer
            lanes = [:]
            owner = [:]
            inFlightBytes = 0
            starved = []
            link = LinkWindow(maximum: link.maximum)
        }

        /// Bytes `lane` may add in flight: what is left of its own window and of the link's. (A
        /// lane with nothing in flight sends one delivery even without room: a destination that
        /// is down and holds its window never stops the others.)
        func room(for lane: Lane, windowBytes: Int) -> Int {
            min(windowBytes - lane.inFlightBytes, link.bytes - inFlightBytes)
        }

        mutating func send(_ id: Int64, bytes: Int, of target: DeliveryTarget, in lane: inout Lane) {
            lane.inFlight.insert(id)
            lane.inFlightBytes += bytes
            inFlightBytes += bytes
            owner[id] = (target, bytes)
        }

        /// Forgets delivery `id` as in flight (the router answered); returns its destination and
        /// lane, and takes the destinations that waited for room in the link's window.
        mutating func land(_ id: Int64) -> (target: DeliveryTarget, lane: Lane, bytes: Int, starved: Set<DeliveryTarget>)? {
            guard let (target, bytes) = owner.removeValue(forKey: id), var lane = lanes[target] else { return nil }
            lane.inFlight.remove(id)
            lane.inFlightBytes -= bytes
            inFlightBytes -= bytes
            defer { starved = [] }
            return (target, lane, bytes, starved)
        }
    }

    private let state: NIOLockedValueBox<State>
    private let spool: Spool
    private let tenants: Tenants
    private let window: Int
    private let windowBytes: Int
    private let logger: Logger
    private let metrics = IngestMetrics.shared
    /// Where passes run (nil: the pump's queue): the loop of the router connection and the HTTP
    /// handlers, which appends and acks already woke. A pass on the loop never reads the spool:
    /// full passes (which read it for every lane), and the lanes that are below their in-memory
    /// floor (after a refusal, a reconnect or an eviction), are handed to the pump's queue.
    private let loop: EventLoop?
    /// Holds the answers of requests whose destinations fall behind (see `IntakeGate`).
    let gate: IntakeGate
    /// The memory's bytes for flowing destinations above which their requests' answers wait:
    /// by default 7/8 of it, near where it would evict (and the evicted be read back). At half of
    /// it, batches with 50 tenants at max load were held while memory was a useful buffer, not a
    /// cost: 10–13% fewer events delivered (docs/BENCHMARKS.md, session 16).
    private let holdBytes: Int

    /// `maxHold`: how long a request's answer may wait while its destinations are behind (zero:
    /// never held); `holdBytes`: see the property (nil: 7/8 of the feeder's memory).
    init(
        spool: Spool, tenants: Tenants, window: Int = 128, windowBytes: Int = 4 << 20, totalWindowBytes: Int = 6 << 20,
        maxHold: Duration = .zero, holdBytes: Int? = nil, loop: EventLoop? = nil, logger: Logger
    ) {
        self.spool = spool
        self.tenants = tenants
        self.window = window
        self.windowBytes = windowBytes
        state = NIOLockedValueBox(State(link: LinkWindow(maximum: totalWindowBytes)))
        self.loop = loop
        self.logger = logger
        self.holdBytes = holdBytes ?? spool.freshCapacity / 8 * 7
        let relay = WeakRelay<RouterLink>()
        gate = IntakeGate(
            maxHold: maxHold, behind: { relay.target?.behind() },
            schedule: { delay, body in
                let nanoseconds = Int64(delay / .nanoseconds(1))
                if let loop {
                    loop.scheduleTask(in: .nanoseconds(nanoseconds)) { body() }
                } else {
                    DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(nanoseconds)), execute: body)
                }
            })
        relay.target = self
    }

    /// Which requests must wait for their answer (nil: none): while the router is connected and
    /// ready and the feeder's memory holds more than `holdBytes` for destinations that flow, those
    /// of a destination holding more than its share of that (`holdBytes` divided among the
    /// flowing destinations that hold some) — a slow destination holds its own tenant's answers,
    /// not everyone's. A destination does not flow while the router's refusal pauses it, or when
    /// it has deliveries in flight and no ack for `stallAfter` (down, or its output gone): it
    /// holds no one.
    private func behind() -> (@Sendable ([DeliveryTarget]) -> Bool)? {
        let limit = holdBytes
        guard spool.freshBytes > limit else { return nil }
        let stopped = state.withLockedValue { s -> Set<DeliveryTarget>? in
            guard s.peer != nil, s.outputsReady else { return nil }
            let now = ContinuousClock.now
            var stopped = Set<DeliveryTarget>()
            for (target, lane) in s.lanes {
                if let until = lane.pausedUntil, until > now {
                    stopped.insert(target)
                } else if !lane.inFlight.isEmpty, lane.lastAck.map({ now - $0 > Self.stallAfter }) ?? true {
                    stopped.insert(target)
                }
            }
            return stopped
        }
        guard let stopped else { return nil }
        let (bytes, destinations) = spool.freshBytes(excluding: stopped)
        guard bytes > limit else { return nil }
        let share = limit / max(1, destinations)
        return { [spool] targets in targets.contains { !stopped.contains($0) && spool.freshBytes(of: $0) > share } }
    }

    /// How long a destination with deliveries in flight may go without an ack before it no longer
    /// counts as flowing (see `behind`).
    static let stallAfter = Duration.seconds(1)

    var isConnected: Bool { state.withLockedValue { $0.peer != nil } }
    var outputsReady: Bool { state.withLockedValue { $0.peer != nil && $0.outputsReady } }

    /// Deliveries sent to the router and not yet answered.
    var inFlight: Int { state.withLockedValue { s in s.lanes.values.reduce(0) { $0 + $1.inFlight.count } } }

    func connected(_ peer: FramePeer) async {
        state.withLockedValue { s in s.reset(peer: peer) }
        pump()
    }

    func disconnected(_ peer: FramePeer) async {
        state.withLockedValue { s in
            guard s.peer == peer else { return }
            s.reset(peer: nil)
            s.outputsReady = false
        }
        gate.release()
    }

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        let id = Int64(bitPattern: frame.id)
        switch frame.type {
        case .ack:
            var deadLetter: Spool.DeadLetter?
            if let payload = frame.payload, let dead = try? JSONValue.parse(payload)["dead"]?.arrayValue, !dead.isEmpty {
                let reasons = dead.compactMap { $0["reason"]?.stringValue }
                let attempts = dead.compactMap { d -> Int? in if case .number(let n)? = d["attempts"] { Int(n) } else { nil } }.max() ?? 0
                deadLetter = Spool.DeadLetter(reason: reasons.joined(separator: "; "), attempts: attempts)
                logger.error("batch dead-lettered for a destination", metadata: ["delivery.id": "\(id)", "reason": "\(deadLetter!.reason)"])
                metrics.deadLettered.increment()
            }
            finish(id, deadLetter: deadLetter)
        case .nack:
            let reason = frame.reason ?? "no reason given"
            if frame.retryable == true {
                // The router cannot take it now: this destination pauses, then resumes from here.
                metrics.routerRefusals.increment()
                let refused = state.withLockedValue { s -> (target: DeliveryTarget, starved: Set<DeliveryTarget>)? in
                    guard let (target, landed, _, starved) = s.land(id) else { return nil }
                    var lane = landed
                    let now = ContinuousClock.now
                    s.link.refused(at: now, pause: RouterLink.refusalPause)
                    lane.refused(at: now, pause: RouterLink.refusalPause)
                    lane.cursor = min(lane.cursor, id - 1)
                    lane.pausedUntil = now + RouterLink.refusalPause
                    s.lanes[target] = lane
                    return (target, starved)
                }
                if let refused {
                    gate.release()  // a paused destination holds no one's answers
                    if !refused.starved.isEmpty { pump(Array(refused.starved)) }
                    Task {
                        try? await Task.sleep(for: RouterLink.refusalPause + .milliseconds(10))
                        self.pump([refused.target])
                    }
                }
            } else {
                logger.error("the router refused a batch; dead-lettered", metadata: ["delivery.id": "\(id)", "reason": "\(reason)"])
                metrics.deadLettered.increment()
                finish(id, deadLetter: .init(reason: reason, attempts: 1))
            }
        case .outputs:
            let ready = frame.payload.flatMap { try? JSONValue.parse($0)["ready"] } == .bool(true)
            state.withLockedValue { $0.outputsReady = ready }
            if !ready { gate.release() }
        case .error:
            logger.warning("router reported an error", metadata: ["error.code": "\(frame.code ?? "")", "error": "\(frame.message ?? "")"])
        default:
            throw FrameError.invalidFrame("unexpected \(frame.type.rawValue) frame from the router")
        }
    }

    private func finish(_ id: Int64, deadLetter: Spool.DeadLetter?) {
        spool.complete(delivery: id, deadLetter: deadLetter)
        let landed = state.withLockedValue { s -> [DeliveryTarget] in
            guard let (target, landed, bytes, starved) = s.land(id) else { return [] }
            var lane = landed
            lane.grow(upTo: window)
            lane.lastAck = .now
            s.link.acked(bytes)
            s.lanes[target] = lane
            return [target] + starved
        }
        if !landed.isEmpty { pump(landed) }
    }

    /// Sends waiting deliveries that the router has not seen on this connection, for every
    /// destination with room in its window. A destination is only looked up in the spool when the
    /// spool holds more for it than is in flight, unless `full` (the idle pump once a second, which
    /// reads every lane from the spool, whatever memory holds). An append
    /// or an answer pumps only its own destination (`pump(_:)`): a pass over every destination
    /// for each of them was 8% of ingest's CPU per event with 50 tenants.
    ///
    /// Never blocks the caller: the pass runs later, one at a time — on the loop when one is given,
    /// full passes (which read the spool for every lane) always on a queue of their own.
    func pump(full: Bool = false) {
        schedulePump { s in
            s.allDirty = true
            if full { s.fullPump = true }
        }
    }

    /// Sends what waits for these destinations (they got deliveries, or room in their window).
    func pump(_ targets: [DeliveryTarget]) {
        schedulePump { s in s.dirty.formUnion(targets) }
    }

    private func schedulePump(_ mark: (inout State) -> Void) {
        let start = state.withLockedValue { s -> Bool in
            mark(&s)
            if s.pumping { return false }
            s.pumping = true
            return true
        }
        guard start else { return }
        if let loop {
            loop.execute { self.pumpPasses(onLoop: true) }
        } else {
            pumpQueue.async { self.pumpPasses(onLoop: false) }
        }
    }

    private let pumpQueue = DispatchQueue(label: "sluice.ingest.pump")

    /// How long a destination waits after the router refused one of its deliveries for lack of room.
    static let refusalPause = Duration.milliseconds(200)

    /// A destination's window now (for tests).
    func window(of target: DeliveryTarget) -> Int { state.withLockedValue { $0.lanes[target]?.window ?? window } }

    private func pumpPasses(onLoop: Bool) {
        while true {
            let pass = state.withLockedValue { s -> (all: Bool, dirty: Set<DeliveryTarget>, full: Bool)? in
                // A pass that reads the spool (every lane's, or a lane's below its in-memory
                // floor): not on the loop.
                if onLoop && (s.fullPump || s.readPump) { return nil }
                defer {
                    s.allDirty = false
                    s.dirty = []
                    s.fullPump = false
                    s.readPump = false
                }
                return (s.allDirty, s.dirty, s.fullPump)
            }
            guard let (all, dirty, full) = pass else {
                // Still one pass at a time: `pumping` stays set, the queue takes over.
                pumpQueue.async { self.pumpPasses(onLoop: false) }
                return
            }
            // Destinations removed by a reload keep draining what the spool holds for them.
            let targets = all ? Set(tenants.targets).union(spool.backlog.keys) : dirty
            let digest = tenants.digest
            // Lanes that sent (they may have more) or whose read raced: the next pass looks again.
            var lookAgain: [DeliveryTarget] = []
            // Lanes this pass (on the loop) left for a pass that may read the spool.
            var needRead = false
            for target in targets {
                let waiting = spool.backlog(of: target)
                let plan = state.withLockedValue { s -> (FramePeer, Int64, Int, bytes: Int, idle: Bool)? in
                    guard let peer = s.peer else { return nil }
                    let lane = s.lanes[target] ?? Lane(window: window)
                    if !full && waiting <= lane.inFlight.count { return nil }  // all of it is in flight
                    if let until = lane.pausedUntil, until > .now { return nil }
                    guard lane.inFlight.count < lane.window else { return nil }
                    let room = s.room(for: lane, windowBytes: windowBytes)
                    guard room > 0 || lane.inFlight.isEmpty else {
                        s.starved.insert(target)
                        return nil
                    }
                    return (peer, lane.cursor, room > 0 ? lane.window - lane.inFlight.count : 1, room, lane.inFlight.isEmpty)
                }
                guard let (peer, cursor, room, roomBytes, idle) = plan else { continue }
                do {
                    // The idle pump reads the spool itself, whatever memory holds.
                    var deliveries: [SpooledDelivery]
                    if onLoop {
                        guard let known = spool.pendingInMemory(target, after: cursor, limit: room, maxBytes: roomBytes) else {
                            needRead = true
                            lookAgain.append(target)
                            continue
                        }
                        deliveries = known
                    } else {
                        deliveries = try spool.pending(target, after: cursor, limit: room, maxBytes: roomBytes, fromMemory: !full)
                    }
                    guard !deliveries.isEmpty else { continue }
                    // Within the lane's byte window and the link's (at least one when none is in
                    // flight: a batch larger than either still goes).
                    deliveries = deliveries.prefix(.max, maxBytes: roomBytes, atLeastOne: idle) { $0.payload.readableBytes }
                    if deliveries.isEmpty { continue }
                    let frames = deliveries.map { d -> Frame in
                        var frame = Frame(type: .batch, id: UInt64(bitPattern: d.id))
                        frame.tenant = d.target.tenant
                        frame.destination = d.target.destination
                        frame.key = d.key
                        frame.payload = d.payload
                        frame.headers = [Header("sluice-batch-id", "\(self.spool.identity)-\(d.batchID)")]
                        frame.config = digest
                        return frame
                    }
                    let current = state.withLockedValue { s -> Bool in
                        // A refusal answered while this pass read the spool moved the cursor back:
                        // sending now would move it forward past the refused deliveries, and they
                        // would never be sent again on this connection. The next pass sends them.
                        guard s.peer == peer, (s.lanes[target]?.cursor ?? 0) == cursor else { return false }
                        var lane = s.lanes[target] ?? Lane(window: window)
                        lane.cursor = deliveries.last!.id
                        for d in deliveries { s.send(d.id, bytes: d.payload.readableBytes, of: target, in: &lane) }
                        s.lanes[target] = lane
                        return true
                    }
                    if current {
                        spool.sent(target, upTo: deliveries.last!.id)
                        metrics.deliveriesSent.increment(by: Int64(frames.count))
                        peer.send(contentsOf: frames)
                        lookAgain.append(target)
                    }
                } catch PayloadLog.Failure.missing(let location) {
                    // A delivery of this read finished meanwhile and its segment went: the next
                    // pass reads the rows again, without it.
                    logger.debug("spool read raced a finished delivery", metadata: ["segment": "\(location.segment)"])
                    lookAgain.append(target)
                } catch {
                    logger.error("cannot read the spool", metadata: ["error": "\(error)"])
                }
            }
            if !lookAgain.isEmpty { gate.release() }
            let again = state.withLockedValue { s -> Bool in
                s.dirty.formUnion(lookAgain)
                if needRead { s.readPump = true }
                if s.allDirty || !s.dirty.isEmpty { return true }
                s.pumping = false
                return false
            }
            if !again { return }
        }
    }
}
