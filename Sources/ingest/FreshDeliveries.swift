import DequeModule

/// Deliveries this process has just spooled and not yet sent to the router, kept in memory so the
/// pump sends them without reading them back from SQLite and the payload log (a query, a `pread`
/// and a reader transaction per request; the readers also kept the checkpoint from rewinding the
/// WAL). What is not here comes from the spool as before: after a reconnect or a refusal (the
/// lane's cursor goes back), a destination that was evicted for room, ids this memory was not
/// told of.
///
/// The rule that makes it safe, per destination: every unfinished delivery with an id above the
/// lane's `floor` is in `waiting`. So a lane whose cursor is at or above its floor is answered
/// from memory alone; below it, from the spool.
///
/// Lanes are changed in place (`lanes[target]`'s modify): a lane copied out, changed and stored
/// back copied its whole queue on every insert — 10% of ingest's CPU at max per event.
struct FreshDeliveries {
    private struct Lane {
        var floor: Int64
        var waiting: Deque<SpooledDelivery> = []
        var bytes = 0
    }

    private var lanes: [DeliveryTarget: Lane] = [:]
    /// The floor of a destination without a lane.
    private var baseFloor: Int64
    /// The last delivery id this process inserted. The next one must follow it: a gap means ids
    /// this memory was not told of (a log write that failed used them up), so from there on only
    /// newer ones are known.
    private var lastInserted: Int64
    private var bytes = 0
    let maxBytes: Int

    /// `lastDeliveryID`: the highest delivery id the spool has ever handed out.
    init(lastDeliveryID: Int64, maxBytes: Int = 4 << 20) {
        baseFloor = lastDeliveryID
        lastInserted = lastDeliveryID
        self.maxBytes = maxBytes
    }

    /// What a delivery costs here: the whole storage its bytes live in. A request's batch is often
    /// a slice of a much larger receive buffer (11 KB in 64 KB or more), all of it kept alive while
    /// the batch is; counting only the batch's bytes let 8 MB of batches hold ~20 MB more (ingest's
    /// peak RSS 45 → 66 MB per event while the router refused).
    static func cost(_ delivery: SpooledDelivery) -> Int { delivery.payload.storageCapacity }

    /// The storage held, as counted against `maxBytes`.
    var heldBytes: Int { bytes }

    /// The storage held for `target`.
    func heldBytes(of target: DeliveryTarget) -> Int { lanes[target]?.bytes ?? 0 }

    /// The storage held for every destination but `excluded`, and how many of them hold some.
    func heldBytes(excluding excluded: Set<DeliveryTarget>) -> (bytes: Int, destinations: Int) {
        var total = 0
        var count = 0
        for (target, lane) in lanes where lane.bytes > 0 && !excluded.contains(target) {
            total += lane.bytes
            count += 1
        }
        return (total, count)
    }

    /// A delivery whose insert has committed (in id order).
    mutating func inserted(_ delivery: SpooledDelivery) {
        if delivery.id != lastInserted + 1 {
            // Someone else's deliveries lie in between: from here on, only newer ones are known.
            lanes = [:]
            bytes = 0
            baseFloor = delivery.id - 1
        }
        lastInserted = delivery.id
        let cost = Self.cost(delivery)
        guard Self.append(delivery, cost: cost, to: &lanes[delivery.target, default: Lane(floor: baseFloor)]) else { return }
        bytes += cost
        while bytes > maxBytes, let largest = lanes.max(by: { $0.value.bytes < $1.value.bytes })?.key {
            evictOldest(of: largest)
        }
    }

    private static func append(_ delivery: SpooledDelivery, cost: Int, to lane: inout Lane) -> Bool {
        guard delivery.id > lane.floor else { return false }  // already sent (read from the spool first)
        lane.waiting.append(delivery)
        lane.bytes += cost
        return true
    }

    /// A delivery that is done (delivered or dead-lettered) must never be sent again.
    mutating func finished(_ id: Int64, target: DeliveryTarget) {
        // (The lane looked at in a scope of its own: a copy alive during the change would copy its queue.)
        let found: Int? = {
            guard let lane = lanes[target], let last = lane.waiting.last, id > lane.floor, id <= last.id else { return nil }
            return lane.waiting.firstIndex { $0.id == id }
        }()
        guard let index = found else { return }
        let gone = lanes[target]!.waiting.remove(at: index)
        lanes[target]!.bytes -= Self.cost(gone)
        bytes -= Self.cost(gone)
    }

    /// Up to `limit` unfinished deliveries of `target` with an id above `after`, oldest first, no
    /// more than fit in `maxBytes` (at least one); nil when memory cannot tell (read the spool).
    func waiting(_ target: DeliveryTarget, after: Int64, limit: Int, maxBytes: Int = .max) -> [SpooledDelivery]? {
        guard let lane = lanes[target] else { return after >= baseFloor ? [] : nil }
        guard after >= lane.floor else { return nil }
        return lane.waiting.lazy.filter { $0.id > after }.prefix(limit, maxBytes: maxBytes) { $0.payload.readableBytes }
    }

    /// The id up to which `target`'s unfinished deliveries may be missing here (memory holds
    /// every one after it).
    func floor(of target: DeliveryTarget) -> Int64 { lanes[target]?.floor ?? baseFloor }

    /// Deliveries of `target` up to `id` went to the router (read from here or from the spool).
    mutating func sent(_ target: DeliveryTarget, upTo id: Int64) {
        bytes -= Self.send(upTo: id, from: &lanes[target, default: Lane(floor: baseFloor)])
    }

    /// Takes the lane's deliveries up to `id` out; returns what they cost.
    private static func send(upTo id: Int64, from lane: inout Lane) -> Int {
        var doneBytes = 0
        while let first = lane.waiting.first, first.id <= id {
            doneBytes += cost(first)
            lane.waiting.removeFirst()
        }
        lane.bytes -= doneBytes
        lane.floor = max(lane.floor, id)
        return doneBytes
    }

    private mutating func evictOldest(of target: DeliveryTarget) {
        guard let first = lanes[target]?.waiting.popFirst() else { return }
        lanes[target]!.bytes -= Self.cost(first)
        lanes[target]!.floor = first.id
        bytes -= Self.cost(first)
    }
}

extension Sequence {
    /// The first elements, at most `limit`, while their sizes add up to no more than `maxBytes` —
    /// and at least one whatever its size, unless `atLeastOne` is false.
    func prefix(_ limit: Int, maxBytes: Int, atLeastOne: Bool = true, size: (Element) -> Int) -> [Element] {
        var found: [Element] = []
        var bytes = 0
        for element in self {
            guard found.count < limit else { break }
            let n = size(element)
            if (!found.isEmpty || !atLeastOne) && bytes + n > maxBytes { break }
            bytes += n
            found.append(element)
        }
        return found
    }
}
