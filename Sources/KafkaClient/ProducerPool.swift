import Foundation
import Logging

/// The producers of an output process, shared by every destination on the same cluster and
/// credentials, and the messages they have in flight. Both outputs (kafka-out, keen-out) use it:
/// a message is handed over with a `Context` (who is waiting for it), and each outcome comes back
/// with that context once Kafka confirmed it or gave up.
public final class ProducerPool<Context: Sendable>: @unchecked Sendable {
    public struct Outcome: Sendable {
        public var context: Context
        /// nil: delivered (acks=all).
        public var error: KafkaError?
    }

    private let lock = NSLock()
    private var producers: [ProducerConfiguration: KafkaProducer] = [:]
    private var statistics: [ObjectIdentifier: ProducerStatistics] = [:]
    private var inFlight: [UInt64: (context: Context, producer: ObjectIdentifier)] = [:]
    private var nextID: UInt64 = 1
    private let logger: Logger
    private let onOutcomes: @Sendable ([Outcome]) -> Void
    private let onStatistics: @Sendable (_ all: [ProducerStatistics]) -> Void
    private let onError: @Sendable (KafkaError, ProducerConfiguration) -> Void

    public init(
        logger: Logger, onOutcomes: @escaping @Sendable ([Outcome]) -> Void,
        onStatistics: @escaping @Sendable ([ProducerStatistics]) -> Void = { _ in },
        onError: @escaping @Sendable (KafkaError, ProducerConfiguration) -> Void = { _, _ in }
    ) {
        self.logger = logger
        self.onOutcomes = onOutcomes
        self.onStatistics = onStatistics
        self.onError = onError
    }

    public var count: Int { lock.withLock { producers.count } }

    /// The producer for `configuration`, created on first use (or after a fatal error).
    /// `metadata` names, in librdkafka's log lines, the destination that first needed it.
    public func producer(for configuration: ProducerConfiguration, metadata: Logger.Metadata) throws(KafkaError) -> KafkaProducer {
        if let p = lock.withLock({ producers[configuration] }), p.fatalError == nil { return p }
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
            onDelivery: { [weak self] reports in self?.delivered(reports) })
        box.withLock { identity = ObjectIdentifier(producer) }
        producerLogger.info("kafka producer created")
        var orphaned: [Outcome] = []
        let chosen: KafkaProducer = lock.withLock {
            if let p = producers[configuration], p.fatalError == nil { return p }
            if let old = producers[configuration], let error = old.fatalError {
                // A producer that hit a fatal error reports nothing more: what it still held is
                // answered now, as retryable, and goes out again through the new one.
                let id = ObjectIdentifier(old)
                statistics[id] = nil
                for (key, entry) in inFlight where entry.producer == id {
                    inFlight[key] = nil
                    orphaned.append(
                        Outcome(
                            context: entry.context,
                            error: KafkaError(code: error.code, name: error.name, message: error.message, isRetriable: true)))
                }
            }
            producers[configuration] = producer
            return producer
        }
        if !orphaned.isEmpty { onOutcomes(orphaned) }
        return chosen
    }

    /// Hands one message to `producer`. Throws what librdkafka refused (`_QUEUE_FULL`: wait and
    /// call again); nothing is then in flight for it.
    public func produce(
        _ producer: KafkaProducer, topic: String, key: UnsafeRawBufferPointer?, value: UnsafeRawBufferPointer,
        headers: [(name: String, value: String)], context: Context
    ) throws(KafkaError) {
        let id = lock.withLock {
            let id = nextID
            nextID += 1
            inFlight[id] = (context, ObjectIdentifier(producer))
            return id
        }
        do {
            try producer.produce(topic: topic, key: key, value: value, headers: headers, id: id)
        } catch {
            lock.withLock { _ = inFlight.removeValue(forKey: id) }
            throw error
        }
    }

    /// Forgets the contexts that match (their outcomes are no longer wanted, e.g. the router
    /// connection they came from is gone).
    public func forget(where match: (Context) -> Bool) {
        lock.withLock { inFlight = inFlight.filter { !match($0.value.context) } }
    }

    /// Closes the producers whose configuration is not in `needed`, after what they hold is
    /// delivered or reported (on a thread of their own). Returns how many.
    @discardableResult
    public func retain(_ needed: Set<ProducerConfiguration>) -> Int {
        let unused: [KafkaProducer] = lock.withLock {
            let gone = producers.filter { !needed.contains($0.key) }
            for (configuration, producer) in gone {
                producers[configuration] = nil
                statistics[ObjectIdentifier(producer)] = nil
            }
            return Array(gone.values)
        }
        guard !unused.isEmpty else { return 0 }
        Thread.detachNewThread {
            for p in unused { _ = p.flush(timeout: .seconds(30)) }
            // Destroyed when this closure lets go of the last reference.
        }
        return unused.count
    }

    /// Waits until every producer delivered what it holds, or `timeout` passes (blocking).
    public func flushAll(timeout: Duration) {
        for p in lock.withLock({ Array(producers.values) }) { p.flush(timeout: timeout) }
    }

    private func delivered(_ reports: [DeliveryReport]) {
        let outcomes: [Outcome] = lock.withLock {
            reports.compactMap { r in inFlight.removeValue(forKey: r.id).map { Outcome(context: $0.context, error: r.error) } }
        }
        if !outcomes.isEmpty { onOutcomes(outcomes) }
    }
}
