import CRdKafka
import Foundation
import NIOCore

/// Hands a producer's messages to librdkafka in rounds per partition: a partition's messages wait
/// here for the linger, then go over together — unless it has 5 or more in flight: then they wait
/// for the answers that bring it below that.
///
/// Why: librdkafka's idempotent producer (2.0.2 and later) lets a partition have more produce
/// requests in flight only while it has fewer than 5 *messages* in flight, and while its next
/// batch is due but cannot go, its broker thread's next wake-up is "now": it polls its socket
/// without a timeout until the answer comes. Against brokers 10 ms away a producer at 5k
/// messages/s used 1.5 cores that way (docs/BENCHMARKS.md, session 19). With the messages held
/// here, librdkafka's queue is empty while it waits, and its thread sleeps.
///
/// The partition is chosen here, as librdkafka's default partitioner would (`consistent_random`:
/// CRC32 of the key modulo the partition count, a random partition without a key), from the
/// partition count in the producer's statistics; until they name a topic's partitions, its
/// messages go straight to librdkafka, which partitions them itself. The linger is split: the
/// configured one here, but for half a millisecond that librdkafka keeps, so that a round's
/// messages, handed over one by one, leave in one request.
///
/// Everything, including the hand-over to librdkafka, happens under one lock: a handle is never
/// used once `stop` returned, and a partition's messages reach librdkafka in the order given.
final class PartitionRounds: @unchecked Sendable {
    /// A topic of the producer: its partitions' rounds (empty: partition count not known yet).
    final class Topic: @unchecked Sendable {
        let name: String
        /// librdkafka's topic (set once, before the topic is added).
        var handle: OpaquePointer!
        fileprivate var partitions: [Partition] = []
        init(name: String) { self.name = name }
    }

    fileprivate struct Partition {
        /// Messages of this partition handed to librdkafka, not yet reported.
        var inFlight = 0
        var held: [Held] = []
        var heldBytes = 0
        /// When the oldest held message came (nanoseconds of uptime).
        var heldSince: UInt64 = 0
        var timerArmed = false
    }

    /// A message waiting for its round: one allocation with the value, then the key and the
    /// extra header's value. librdkafka takes the allocation over (`RD_KAFKA_MSG_F_FREE`: it
    /// frees the value pointer) and copies key and headers.
    fileprivate struct Held {
        var block: UnsafeMutableRawPointer
        var valueCount: Int
        var keyCount: Int  // -1: no key
        var extraCount: Int  // -1: no extra header
        var extraName: UnsafePointer<CChar>?
        var headers: KafkaHeaders
        var id: UInt64
        var size: Int { valueCount + max(0, keyCount) + max(0, extraCount) }
    }

    /// The bit set in a message's opaque when it went through a round (its report settles the round).
    static let roundBit: UInt64 = 1 << 63

    private let lock = NSLock()
    private let handle: OpaquePointer
    /// The part of the linger spent here (nanoseconds).
    private let linger: UInt64
    private let loop: EventLoop?
    private let onFailed: @Sendable ([DeliveryReport]) -> Void
    /// A round is at most this much (librdkafka's `batch.size` and `batch.num.messages` defaults,
    /// less room for the request's overhead): more would leave in a second request, which must
    /// wait for the first — the wait this type exists to avoid.
    static let roundBytes = 900_000
    static let roundMessages = 10_000
    /// Held at most (beyond that, `_QUEUE_FULL`, as librdkafka's own queue answers).
    private let maxHeldMessages: Int
    private let maxHeldBytes: Int
    // Under `lock`.
    private var topics: [Topic] = []
    private var heldMessages = 0
    private var heldBytes = 0
    /// No more holding (flushing or stopped); `stopped`: the handle is no longer to be used.
    private var draining = false
    private var stopped = false
    /// For messages without a key (the system generator asks the kernel each time).
    private var random = Xorshift(seed: UInt64.random(in: 1...UInt64.max))
    /// Partitions with held messages and nothing in flight, waiting for their linger; the
    /// deadline of the timer that will look at them.
    private var waiting: [(topic: Topic, partition: Int)] = []
    private var timerAt: UInt64?
    /// librdkafka's idempotent producer sends a partition's next request only while it has fewer
    /// messages than this in flight (`RD_KAFKA_IDEMP_MAX_INFLIGHT`): below it, a round goes without
    /// waiting for answers (at a few messages a round trip, as librdkafka alone would send them).
    static let maxInFlight = 5
    /// A partition due this soon goes now (nanoseconds).
    private static let slack: UInt64 = 500_000

    init(
        handle: OpaquePointer, linger: Duration, maxHeldMessages: Int, maxHeldBytes: Int, loop: EventLoop?,
        onFailed: @escaping @Sendable ([DeliveryReport]) -> Void
    ) {
        self.handle = handle
        let (seconds, attoseconds) = linger.components
        self.linger = UInt64(max(0, seconds)) * 1_000_000_000 + UInt64(max(0, attoseconds / 1_000_000_000))
        self.maxHeldMessages = maxHeldMessages
        self.maxHeldBytes = maxHeldBytes
        self.loop = loop
        self.onFailed = onFailed
    }

    /// How many messages wait for their round.
    var held: Int { lock.withLock { heldMessages } }

    func add(_ topic: Topic) { lock.withLock { topics.append(topic) } }

    /// The partition counts from the producer's statistics, by topic name.
    func update(partitionCounts: [String: Int]) {
        lock.withLock {
            for topic in topics {
                guard let count = partitionCounts[topic.name], count > 0, count != topic.partitions.count else { continue }
                if count > topic.partitions.count {
                    topic.partitions += Array(repeating: Partition(), count: count - topic.partitions.count)
                } else {
                    // Fewer partitions (the topic was made again): what the gone ones hold goes
                    // to librdkafka's partitioner; their reports no longer count.
                    for p in count..<topic.partitions.count {
                        hand(takeHeld(topic, p), topic: topic, partition: RD_KAFKA_PARTITION_UA)
                    }
                    topic.partitions.removeLast(topic.partitions.count - count)
                }
            }
        }
    }

    /// Takes one message: hands it to librdkafka now, or holds it (copied) for its partition's
    /// next round. `_QUEUE_FULL` when too much is held: wait for deliveries and try again.
    func produce(
        _ topic: Topic, key: UnsafeRawBufferPointer?, value: UnsafeRawBufferPointer, headers: KafkaHeaders,
        extra: (name: UnsafePointer<CChar>, value: UnsafeRawBufferPointer)?, id: UInt64
    ) throws(KafkaError) {
        precondition(id & Self.roundBit == 0, "message id \(id) uses the round bit")
        lock.lock()
        defer { lock.unlock() }
        guard !stopped else { throw KafkaError(RD_KAFKA_RESP_ERR__DESTROY) }
        let count = topic.partitions.count
        guard count > 0, !draining else {
            let err = produceMessage(
                handle, topic: topic.handle, partition: RD_KAFKA_PARTITION_UA, key: key, value: value,
                ownsValue: false, headers: headers, extra: extra, opaque: id)
            if let err { throw err }
            return
        }
        let p: Int
        if let key, key.count > 0 {
            p = Int(rd_kafka_msg_partitioner_consistent(topic.handle, key.baseAddress, key.count, Int32(count), nil, nil))
        } else {
            p = Int(random.next() % UInt64(count))
        }
        if linger == 0, topic.partitions[p].inFlight < Self.maxInFlight, topic.partitions[p].held.isEmpty {
            let err = produceMessage(
                handle, topic: topic.handle, partition: Int32(p), key: key, value: value, ownsValue: false, headers: headers,
                extra: extra, opaque: id | Self.roundBit)
            if let err { throw err }
            topic.partitions[p].inFlight += 1
            return
        }
        guard heldMessages < maxHeldMessages, heldBytes < maxHeldBytes else {
            throw KafkaError(RD_KAFKA_RESP_ERR__QUEUE_FULL, message: "Local: Queue full (messages held for their partition's round)")
        }
        let message = Held(copying: key, value: value, headers: headers, extra: extra, id: id)
        if topic.partitions[p].held.isEmpty { topic.partitions[p].heldSince = Self.now() }
        topic.partitions[p].held.append(message)
        topic.partitions[p].heldBytes += message.size
        heldMessages += 1
        heldBytes += message.size
        if topic.partitions[p].inFlight < Self.maxInFlight { advance(topic, p) }
    }

    /// Reports of messages handed over by a round, as (topic opaque, partition): when a
    /// partition falls below `maxInFlight`, its next round goes (or waits for the rest of its linger).
    func settled(_ reports: [(topic: UnsafeMutableRawPointer, partition: Int32)]) {
        lock.lock()
        defer { lock.unlock() }
        for (opaque, p) in reports {
            let topic = Unmanaged<Topic>.fromOpaque(opaque).takeUnretainedValue()
            guard p >= 0, Int(p) < topic.partitions.count, topic.partitions[Int(p)].inFlight > 0 else { continue }
            topic.partitions[Int(p)].inFlight -= 1
            if topic.partitions[Int(p)].inFlight < Self.maxInFlight, !stopped { advance(topic, Int(p)) }
        }
    }

    /// Hands over everything held and holds nothing more (before a flush).
    func drain() {
        lock.lock()
        defer { lock.unlock() }
        draining = true
        guard !stopped else { return }
        for topic in topics {
            for p in topic.partitions.indices where !topic.partitions[p].held.isEmpty {
                let all = takeHeld(topic, p)
                topic.partitions[p].inFlight += all.count
                hand(all, topic: topic, partition: Int32(p))
            }
        }
    }

    /// The handle is about to go: what is still held is dropped (the producer's owner answers
    /// its messages), and nothing is handed over any more.
    func stop() {
        lock.lock()
        defer { lock.unlock() }
        stopped = true
        for topic in topics {
            for p in topic.partitions.indices {
                for m in topic.partitions[p].held { free(m.block) }
                topic.partitions[p].held = []
            }
        }
        heldMessages = 0
        heldBytes = 0
    }

    // MARK: Under the lock

    /// The partition has fewer than `maxInFlight` in flight: its held messages go now if their
    /// linger passed (or they fill a round), else when it will have.
    private func advance(_ topic: Topic, _ p: Int) {
        guard !topic.partitions[p].held.isEmpty else { return }
        let due = topic.partitions[p].heldSince + linger
        let full = topic.partitions[p].heldBytes >= Self.roundBytes || topic.partitions[p].held.count >= Self.roundMessages
        if full || Self.now() + Self.slack >= due {
            release(topic, p)
        } else {
            arm(topic, p, at: due)
        }
    }

    /// Hands over one round of the partition's held messages.
    private func release(_ topic: Topic, _ p: Int) {
        var bytes = 0
        var n = 0
        for m in topic.partitions[p].held {
            if n > 0, bytes + m.size > Self.roundBytes || n == Self.roundMessages { break }
            bytes += m.size
            n += 1
        }
        // What stays (more than a round) keeps `heldSince`: it has waited at least as long.
        let round = Array(topic.partitions[p].held.prefix(n))
        topic.partitions[p].held.removeFirst(n)
        topic.partitions[p].heldBytes -= bytes
        forget(round)
        topic.partitions[p].inFlight += n
        hand(round, topic: topic, partition: Int32(p))
    }

    /// Hands messages (taken off the held list) to librdkafka, in order. A message refused for a
    /// full queue goes back, with those after it, and is tried again shortly; any other refusal
    /// is reported as that message's outcome.
    private func hand(_ messages: [Held], topic: Topic, partition p: Int32) {
        var failed: [DeliveryReport] = []
        for (i, m) in messages.enumerated() {
            let key = m.keyCount < 0 ? nil : UnsafeRawBufferPointer(start: m.block + m.valueCount, count: m.keyCount)
            let extra = m.extraName.map { ($0, UnsafeRawBufferPointer(start: m.block + m.valueCount + max(0, m.keyCount), count: m.extraCount)) }
            let inRound = p != RD_KAFKA_PARTITION_UA
            guard
                let err = produceMessage(
                    handle, topic: topic.handle, partition: p, key: key,
                    value: UnsafeRawBufferPointer(start: m.block, count: m.valueCount), ownsValue: true, headers: m.headers,
                    extra: extra, opaque: inRound ? m.id | Self.roundBit : m.id)
            else { continue }
            if err.name == "_QUEUE_FULL", inRound {
                let rest = Array(messages[i...])
                topic.partitions[Int(p)].held.insert(contentsOf: rest, at: 0)
                let bytes = rest.reduce(0) { $0 + $1.size }
                topic.partitions[Int(p)].heldBytes += bytes
                topic.partitions[Int(p)].heldSince = 0  // due at once
                topic.partitions[Int(p)].inFlight -= rest.count
                heldMessages += rest.count
                heldBytes += bytes
                if topic.partitions[Int(p)].inFlight < Self.maxInFlight { arm(topic, Int(p), at: Self.now() + 2_000_000) }
                break
            }
            free(m.block)
            if inRound { topic.partitions[Int(p)].inFlight -= 1 }
            failed.append(DeliveryReport(id: m.id, error: err, partition: p, offset: -1))
        }
        if !failed.isEmpty {
            let reports = failed
            let onFailed = onFailed
            // Not under the lock (the owner may produce again from its callback); where reports go.
            if let loop { loop.execute { onFailed(reports) } } else { DispatchQueue.global().async { onFailed(reports) } }
        }
        // Messages refused above may have emptied the round: the next one can go.
        if p >= 0, Int(p) < topic.partitions.count, topic.partitions[Int(p)].inFlight < Self.maxInFlight, !failed.isEmpty {
            advance(topic, Int(p))
        }
    }

    /// Takes every message the partition holds off it.
    private func takeHeld(_ topic: Topic, _ p: Int) -> [Held] {
        let all = topic.partitions[p].held
        forget(all)
        topic.partitions[p].held = []
        topic.partitions[p].heldBytes = 0
        return all
    }

    private func forget(_ messages: [Held]) {
        heldMessages -= messages.count
        heldBytes -= messages.reduce(0) { $0 + $1.size }
    }

    /// Wakes for the partition's linger: one timer serves every partition due within `slack` of
    /// it (a timer each cost a wake-up each: with 300 partitions, tens of thousands a second).
    private func arm(_ topic: Topic, _ p: Int, at deadline: UInt64) {
        guard !topic.partitions[p].timerArmed else { return }
        topic.partitions[p].timerArmed = true
        waiting.append((topic, p))
        if let at = timerAt, at <= deadline + Self.slack { return }
        schedule(at: deadline)
    }

    private func schedule(at deadline: UInt64) {
        timerAt = deadline
        let fire: @Sendable () -> Void = { [self] in self.timerFired() }
        let now = Self.now()
        let delay = deadline > now ? deadline - now : 0
        if let loop {
            loop.scheduleTask(in: .nanoseconds(Int64(delay)), fire)
        } else {
            DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(delay)), execute: fire)
        }
    }

    /// Releases the waiting partitions that are due (or nearly), and wakes again for the rest.
    private func timerFired() {
        lock.lock()
        defer { lock.unlock() }
        timerAt = nil
        guard !stopped else { return }
        let list = waiting
        waiting = []
        var next: UInt64?
        let now = Self.now()
        for (topic, p) in list where p < topic.partitions.count {
            guard topic.partitions[p].inFlight < Self.maxInFlight, !topic.partitions[p].held.isEmpty else {
                topic.partitions[p].timerArmed = false  // an answer releases it
                continue
            }
            let due = topic.partitions[p].heldSince + linger
            if due <= now + Self.slack {
                topic.partitions[p].timerArmed = false
                release(topic, p)
            } else {
                waiting.append((topic, p))
                next = min(next ?? due, due)
            }
        }
        if let next, timerAt.map({ $0 > next + Self.slack }) ?? true { schedule(at: next) }
    }

    private static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
}

extension PartitionRounds.Held {
    fileprivate init(
        copying key: UnsafeRawBufferPointer?, value: UnsafeRawBufferPointer, headers: KafkaHeaders,
        extra: (name: UnsafePointer<CChar>, value: UnsafeRawBufferPointer)?, id: UInt64
    ) {
        let total = value.count + (key?.count ?? 0) + (extra?.value.count ?? 0)
        block = malloc(max(1, total))!
        var at = block
        if value.count > 0 { at.copyMemory(from: value.baseAddress!, byteCount: value.count) }
        at += value.count
        if let key, key.count > 0 { at.copyMemory(from: key.baseAddress!, byteCount: key.count) }
        at += key?.count ?? 0
        if let extra, extra.value.count > 0 { at.copyMemory(from: extra.value.baseAddress!, byteCount: extra.value.count) }
        valueCount = value.count
        keyCount = key?.count ?? -1
        extraCount = extra?.value.count ?? -1
        extraName = extra?.name
        self.headers = headers
        self.id = id
    }
}

/// xorshift64* (Vigna): a partition for each message without a key, cheaply.
private struct Xorshift {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 2_685_821_657_736_338_717
    }
}
