import CRdKafka
import Foundation
import Logging
import NIOCore

/// A group's messages still in flight. Outside the generic pool (the context is kept apart), so
/// the per-message work does not pay for generic metadata.
private struct Pending {
    var producer: ObjectIdentifier
    var count: Int
    var remaining: Int
    /// One bit per message: settled (delivered or failed).
    var settled: [UInt64]
    var failures: [(index: Int, error: KafkaError)] = []

    init(producer: ObjectIdentifier, count: Int) {
        self.producer = producer
        self.count = count
        remaining = count
        settled = [UInt64](repeating: 0, count: (count + 63) / 64)
    }

    /// Records message `index`'s outcome (once); returns how many are still unsettled.
    mutating func settle(_ index: Int, error: KafkaError?) -> Int {
        guard index < count else { return remaining }
        let bit: UInt64 = 1 << UInt64(index % 64)
        guard settled[index / 64] & bit == 0 else { return remaining }
        settled[index / 64] |= bit
        remaining -= 1
        if let error { failures.append((index, error)) }
        return remaining
    }

    var unsettled: [Int] { (0..<count).filter { settled[$0 / 64] & (1 << UInt64($0 % 64)) == 0 } }
}

/// The groups in flight, by number; a message's id is its group's number and its index.
private struct PendingGroups {
    static let indexBits: UInt64 = 20
    /// 43 bits: a message id's top bit is the producer's (`PartitionRounds.roundBit`).
    static let maxNumber: UInt64 = (1 << (63 - indexBits)) - 1
    var groups: [UInt64: Pending] = [:]

    /// Settles the messages; returns the groups now complete (removed). Reports come in runs of
    /// one group (a frame's messages share a key, so a partition): each run costs one lookup, its
    /// group settled outside the dictionary and put back if still incomplete.
    mutating func settle(_ reports: [DeliveryReport]) -> [(number: UInt64, group: Pending)] {
        let mask: UInt64 = (1 << Self.indexBits) - 1
        var done: [(number: UInt64, group: Pending)] = []
        var current: (number: UInt64, group: Pending)?
        for report in reports {
            let number = report.id >> Self.indexBits
            if current?.number != number {
                if let c = current { groups[c.number] = c.group }
                current = groups.removeValue(forKey: number).map { (number, $0) }
            }
            guard current != nil, current!.group.settle(Int(report.id & mask), error: report.error) == 0 else { continue }
            done.append(current!)
            current = nil
        }
        if let c = current { groups[c.number] = c.group }
        return done
    }
}

/// The producers of an output process, shared by every destination on the same cluster and
/// credentials, and the messages they have in flight. Both outputs (kafka-out, keen-out) use it.
/// Messages are handed over in groups (a frame's messages), each group with a `Context` (who is
/// waiting for it): the group's outcome comes back once, with that context, when Kafka confirmed
/// or gave up on every one of its messages. A message's librdkafka id is its group's number and
/// its index in the group, so the pool keeps one entry per group, not one per message.
public final class ProducerPool<Context: Sendable>: @unchecked Sendable {
    public struct Outcome: Sendable {
        public var context: Context
        /// How many messages the group had.
        public var count: Int
        /// The messages that failed (index in the group, error), in index order; empty: every
        /// message was delivered (acks=all).
        public var failures: [(index: Int, error: KafkaError)]
    }

    /// A group of messages being handed over: gives each message its id.
    public struct Group: Sendable {
        public let number: UInt64
        public let count: Int
        /// The id to produce message `index` (0..<count) of this group with.
        public func id(_ index: Int) -> UInt64 {
            precondition(index >= 0 && index < count, "message \(index) of a group of \(count)")
            return number << PendingGroups.indexBits | UInt64(index)
        }
    }

    /// Largest number of messages in one group.
    public static var maxGroupSize: Int { 1 << PendingGroups.indexBits }

    private let lock = NSLock()
    private var producers: [ProducerConfiguration: KafkaProducer] = [:]
    private var statistics: [ObjectIdentifier: ProducerStatistics] = [:]
    private var pending = PendingGroups()
    private var contexts: [UInt64: Context] = [:]
    private var nextGroup: UInt64 = 1
    private let logger: Logger
    private let onOutcomes: @Sendable ([Outcome]) -> Void
    private let onStatistics: @Sendable (_ all: [ProducerStatistics]) -> Void
    private let onError: @Sendable (KafkaError, ProducerConfiguration) -> Void
    /// Where the producers' events (delivery reports) are served; nil: a thread per producer.
    private let eventLoop: EventLoop?

    public init(
        logger: Logger, onOutcomes: @escaping @Sendable ([Outcome]) -> Void,
        onStatistics: @escaping @Sendable ([ProducerStatistics]) -> Void = { _ in },
        onError: @escaping @Sendable (KafkaError, ProducerConfiguration) -> Void = { _, _ in },
        eventLoop: EventLoop? = nil
    ) {
        self.eventLoop = eventLoop
        self.logger = logger
        self.onOutcomes = onOutcomes
        self.onStatistics = onStatistics
        self.onError = onError
    }

    public var count: Int { lock.withLock { producers.count } }

    /// The producer for `configuration`, created on first use (or after a fatal error).
    /// `metadata` names, in librdkafka's log lines, the destination that first needed it.
    public func producer(for configuration: ProducerConfiguration, metadata: Logger.Metadata) throws(KafkaError) -> KafkaProducer {
        if let p = existing(configuration) { return p }
        var producerLogger = logger
        for (k, v) in metadata { producerLogger[metadataKey: k] = v }
        producerLogger[metadataKey: "kafka.bootstrap"] = "\(configuration.bootstrapServers)"
        producerLogger[metadataKey: "kafka.security_protocol"] = "\(configuration.securityProtocol.rawValue)"
        producerLogger[metadataKey: "kafka.sasl_mechanism"] = "\(configuration.sasl?.mechanism.rawValue ?? "-")"
        let box = NSLock()
        nonisolated(unsafe) var identity: ObjectIdentifier?
        let producer = try KafkaProducer(
            configuration: configuration, logger: producerLogger,
            onStatistics: { [weak self] stats in
                guard let self, let id = box.withLock({ identity }) else { return }
                let all = self.lock.withLock { () -> [ProducerStatistics] in
                    self.statistics[id] = stats
                    return Array(self.statistics.values)
                }
                self.onStatistics(all)
            },
            onError: { [weak self] error in self?.onError(error, configuration) },
            eventLoop: eventLoop,
            onDelivery: { [weak self] reports in self?.delivered(reports) })
        box.withLock { identity = ObjectIdentifier(producer) }
        producerLogger.info("kafka producer created", metadata: ["kafka.partition_rounds": "\(configuration.partitionRounds)"])
        var orphaned: [Outcome] = []
        let chosen: KafkaProducer = lock.withLock {
            if let p = producers[configuration], p.fatalError == nil { return p }
            if let old = producers[configuration], let error = old.fatalError {
                // A producer that hit a fatal error reports nothing more: what it still held is
                // answered now, as retryable, and goes out again through the new one.
                statistics[ObjectIdentifier(old)] = nil
                orphaned = abandon(old, error: KafkaError(code: error.code, name: error.name, message: error.message, isRetriable: true))
            }
            producers[configuration] = producer
            return producer
        }
        if !orphaned.isEmpty { onOutcomes(orphaned) }
        return chosen
    }

    /// The producer for `configuration` if there is one that can still send (no fatal error).
    public func existing(_ configuration: ProducerConfiguration) -> KafkaProducer? {
        guard let p = lock.withLock({ producers[configuration] }), p.fatalError == nil else { return nil }
        return p
    }

    /// Starts a group of `count` messages for `producer`, answered with `context` once all are
    /// settled. Hand each message to the producer with `group.id(index)`; settle those it refuses
    /// with `refused`.
    public func begin(_ producer: KafkaProducer, count: Int, context: Context) -> Group {
        precondition(count > 0 && count <= Self.maxGroupSize, "a group has 1...\(Self.maxGroupSize) messages")
        return lock.withLock {
            let number = nextGroup
            // 43 bits of group number (20 are the index, 1 the producer's); wraps after 2^43 groups.
            nextGroup = nextGroup == PendingGroups.maxNumber ? 1 : nextGroup + 1
            pending.groups[number] = Pending(producer: ObjectIdentifier(producer), count: count)
            contexts[number] = context
            return Group(number: number, count: count)
        }
    }

    /// Message `index` of `group` was refused by librdkafka (not `_QUEUE_FULL`, which is retried):
    /// it is settled as failed.
    public func refused(_ group: Group, index: Int, error: KafkaError) {
        delivered([DeliveryReport(id: group.id(index), error: error, partition: -1, offset: -1)])
    }

    /// Forgets the groups whose context matches (their outcomes are no longer wanted, e.g. the
    /// router connection they came from is gone).
    public func forget(where match: (Context) -> Bool) {
        lock.withLock {
            for (number, context) in contexts where match(context) {
                contexts[number] = nil
                pending.groups[number] = nil
            }
        }
    }

    /// Answers every group `producer` still holds, its unsettled messages failed with `error`
    /// (retryable: they go out again, through another producer). Called with the lock held.
    private func abandon(_ producer: KafkaProducer, error: KafkaError) -> [Outcome] {
        let id = ObjectIdentifier(producer)
        var outcomes: [Outcome] = []
        for (number, group) in pending.groups where group.producer == id {
            pending.groups[number] = nil
            guard let context = contexts.removeValue(forKey: number) else { continue }
            let failures = (group.failures + group.unsettled.map { ($0, error) }).sorted { $0.index < $1.index }
            outcomes.append(Outcome(context: context, count: group.count, failures: failures))
        }
        return outcomes
    }

    /// Closes the producers whose configuration is not in `needed`, after what they hold is
    /// delivered or reported (on a thread of their own), waiting at most `flushTimeout`: what is
    /// still unreported then (its cluster unreachable, say) is answered as failed and retryable —
    /// the sender offers it again, to whatever destination the tenant has now. Returns how many.
    @discardableResult
    public func retain(_ needed: Set<ProducerConfiguration>, flushTimeout: Duration = .seconds(30)) -> Int {
        let unused: [KafkaProducer] = lock.withLock {
            let gone = producers.filter { !needed.contains($0.key) }
            for (configuration, producer) in gone {
                producers[configuration] = nil
                statistics[ObjectIdentifier(producer)] = nil
            }
            return Array(gone.values)
        }
        guard !unused.isEmpty else { return 0 }
        // A thread each: one producer's unreachable cluster must not delay another's answers.
        for p in unused {
            Thread.detachNewThread { [self] in
                guard p.flush(timeout: flushTimeout) > 0 else { return }
                let closed = KafkaError(
                    code: RD_KAFKA_RESP_ERR__TIMED_OUT.rawValue, name: "_TIMED_OUT",
                    message: "the producer was closed (no destination uses it) before Kafka confirmed", isRetriable: true)
                let outcomes = lock.withLock { abandon(p, error: closed) }
                if !outcomes.isEmpty { onOutcomes(outcomes) }
                // Destroyed when this closure lets go of the last reference.
            }
        }
        return unused.count
    }

    /// Waits until every producer delivered what it holds, or `timeout` passes (blocking).
    public func flushAll(timeout: Duration) {
        for p in lock.withLock({ Array(producers.values) }) { p.flush(timeout: timeout) }
    }

    /// Settles messages by id; answers the groups that are complete.
    private func delivered(_ reports: [DeliveryReport]) {
        let outcomes: [Outcome] = lock.withLock {
            pending.settle(reports).compactMap { number, group in
                contexts.removeValue(forKey: number).map {
                    Outcome(context: $0, count: group.count, failures: group.failures.sorted { $0.index < $1.index })
                }
            }
        }
        if !outcomes.isEmpty { onOutcomes(outcomes) }
    }
}
