import Foundation
import KafkaClient
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Observability
import Prometheus
import ServiceLifecycle
import Shared

/// Serves the router's connection: keeps the destinations it is told about, publishes each batch
/// through a producer shared by every destination of the same cluster and credentials, and answers
/// `ack` only when Kafka confirmed the message (`nack` with the reason otherwise).
final class KafkaPublisher: FrameConnectionHandler, Service {
    private struct InFlight {
        var peer: FramePeer
        var routerID: UInt64
    }

    private struct State {
        var destinations: [String: KafkaDestination] = [:]
        var producers: [ProducerConfiguration: KafkaProducer] = [:]
        var statistics: [ObjectIdentifier: ProducerStatistics] = [:]
        var inFlight: [UInt64: InFlight] = [:]
        var nextID: UInt64 = 1
        /// The router connection (for reporting client errors), and when each producer last reported.
        var router: FramePeer?
        var lastReported: [ObjectIdentifier: ContinuousClock.Instant] = [:]
    }

    private let state = NIOLockedValueBox(State())
    private let devBootstrapFile: String
    private let messageTimeout: Duration
    private let logger: Logger
    private let metrics = KafkaOutMetrics()

    init(devBootstrapFile: String, messageTimeout: Duration = .seconds(300), logger: Logger) {
        self.devBootstrapFile = devBootstrapFile
        self.messageTimeout = messageTimeout
        self.logger = logger
    }

    // MARK: Service: flush on shutdown

    func run() async throws {
        try? await gracefulShutdown()
        let producers = state.withLockedValue { Array($0.producers.values) }
        // Blocking flushes run off the cooperative pool.
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread {
                for p in producers { p.flush(timeout: .seconds(10)) }
                c.resume()
            }
        }
        logger.info("kafka-out stopped")
    }

    // MARK: Frames

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        switch frame.type {
        case .destination:
            guard let key = frame.destination else { throw FrameError.invalidFrame("destination frame without key") }
            guard let payload = frame.payload else {
                // The router no longer uses this destination (a reload changed or removed it).
                forget(key)
                return
            }
            let spec = try KafkaDestination(wireJSON: try JSONValue.parse(payload))
            state.withLockedValue {
                $0.destinations[key] = spec
                $0.router = peer
            }
        case .batch:
            try await publish(frame, peer: peer)
        case .error:
            logger.warning("router reported an error", metadata: ["error.code": "\(frame.code ?? "")", "error": "\(frame.message ?? "")"])
        case .hello, .ack, .nack, .outputs, .status:
            throw FrameError.invalidFrame("unexpected \(frame.type.rawValue) frame")
        }
    }

    func disconnected(_ peer: FramePeer) async {
        // The router re-sends what it had not seen confirmed; late reports for this connection are dropped.
        state.withLockedValue { s in
            s.inFlight = s.inFlight.filter { $0.value.peer != peer }
        }
    }

    private func publish(_ frame: Frame, peer: FramePeer) async throws {
        guard let destinationKey = frame.destination, let payload = frame.payload else {
            throw FrameError.invalidFrame("batch frame without destination or payload")
        }
        guard let destination = state.withLockedValue({ $0.destinations[destinationKey] }) else {
            peer.send(.nack(frame.id, reason: "unknown destination \(destinationKey)", retryable: true))
            return
        }
        let producer: KafkaProducer
        do {
            producer = try self.producer(for: destination, key: destinationKey)
        } catch {
            peer.send(.nack(frame.id, reason: error.description, retryable: error.isRetriable))
            return
        }
        let id = state.withLockedValue { s in
            let id = s.nextID
            s.nextID += 1
            s.inFlight[id] = InFlight(peer: peer, routerID: frame.id)
            return id
        }
        while true {
            let failure: KafkaError? = payload.withUnsafeReadableBytes { value in
                func send(_ key: UnsafeRawBufferPointer?) -> KafkaError? {
                    do throws(KafkaError) {
                        try producer.produce(
                            topic: destination.topic, key: key, value: value,
                            headers: frame.headers?.map { ($0.name, $0.value) } ?? [], id: id)
                        return nil
                    } catch { return error }
                }
                guard var key = frame.key else { return send(nil) }
                return key.withUTF8 { send(UnsafeRawBufferPointer($0)) }
            }
            guard let failure else { return }
            if failure.name == "_QUEUE_FULL" {
                // Backpressure: stop reading from the router until librdkafka has room.
                try await Task.sleep(for: .milliseconds(2))
                continue
            }
            state.withLockedValue { _ = $0.inFlight.removeValue(forKey: id) }
            peer.send(.nack(frame.id, reason: failure.description, retryable: failure.isRetriable))
            return
        }
    }

    private func producer(for destination: KafkaDestination, key: String) throws(KafkaError) -> KafkaProducer {
        let configuration = try producerConfiguration(for: destination)
        let existing: KafkaProducer? = state.withLockedValue { s in
            if let p = s.producers[configuration], p.fatalError == nil { return p }
            return nil
        }
        if let existing { return existing }
        // librdkafka's messages about this cluster (auth, TLS, unreachable brokers) name the
        // destination that first needed the producer, and how it connects.
        var producerLogger = logger
        producerLogger[metadataKey: "destination"] = "\(key.split(separator: "#").first ?? "")"
        producerLogger[metadataKey: "kafka.bootstrap"] = "\(configuration.bootstrapServers)"
        producerLogger[metadataKey: "kafka.security_protocol"] = "\(configuration.securityProtocol.rawValue)"
        producerLogger[metadataKey: "kafka.sasl_mechanism"] = "\(configuration.sasl?.mechanism.rawValue ?? "-")"
        let box = NIOLockedValueBox<ObjectIdentifier?>(nil)
        let producer = try KafkaProducer(
            configuration: configuration, logger: producerLogger,
            onStatistics: { [weak self] stats in
                guard let id = box.withLockedValue({ $0 }) else { return }
                self?.statistics(stats, producer: id)
            },
            onError: { [weak self] error in
                guard let id = box.withLockedValue({ $0 }) else { return }
                self?.clientError(error, producer: id, configuration: configuration)
            },
            onDelivery: { [weak self] reports in self?.delivered(reports) })
        box.withLockedValue { $0 = ObjectIdentifier(producer) }
        producerLogger.info("kafka producer created")
        let (chosen, count) = state.withLockedValue { s in
            if let p = s.producers[configuration], p.fatalError == nil { return (p, s.producers.count) }
            s.producers[configuration] = producer
            return (producer, s.producers.count)
        }
        metrics.producers.set(Double(count))
        return chosen
    }

    /// Drops a destination the router no longer uses, and closes the producers no remaining
    /// destination needs (after their messages are delivered or reported).
    private func forget(_ key: String) {
        let unused: [KafkaProducer] = state.withLockedValue { s in
            s.destinations[key] = nil
            let needed = Set(s.destinations.values.compactMap { try? producerConfiguration(for: $0) })
            let unused = s.producers.filter { !needed.contains($0.key) }
            for (configuration, producer) in unused {
                s.producers[configuration] = nil
                s.statistics[ObjectIdentifier(producer)] = nil
            }
            return Array(unused.values)
        }
        metrics.producers.set(Double(state.withLockedValue { $0.producers.count }))
        guard !unused.isEmpty else { return }
        logger.info("closing producers no destination uses", metadata: ["producers": "\(unused.count)"])
        Thread.detachNewThread {
            for p in unused { _ = p.flush(timeout: .seconds(30)) }
            // The producers are destroyed when the last reference (this closure's) goes.
        }
    }

    /// A client-level error (brokers unreachable, authentication or TLS failed): reported to the
    /// router for each destination on that producer, at most every 5 s, so `status` shows it
    /// even before any message fails.
    private func clientError(_ error: KafkaError, producer: ObjectIdentifier, configuration: ProducerConfiguration) {
        let (router, keys): (FramePeer?, [String]) = state.withLockedValue { s in
            let now = ContinuousClock.now
            if let last = s.lastReported[producer], now - last < .seconds(5) { return (nil, []) }
            s.lastReported[producer] = now
            let keys = s.destinations.filter { (try? producerConfiguration(for: $0.value)) == configuration }.map(\.key)
            return (s.router, keys)
        }
        guard let router else { return }
        for key in keys {
            var frame = Frame.error(code: error.name, message: error.message)
            frame.destination = key
            router.send(frame)
        }
    }

    private func statistics(_ stats: ProducerStatistics, producer: ObjectIdentifier) {
        let all = state.withLockedValue { s -> [ProducerStatistics] in
            s.statistics[producer] = stats
            return Array(s.statistics.values)
        }
        metrics.queued.set(Double(all.reduce(0) { $0 + $1.queuedMessages }))
        metrics.rttAverage.set(all.map(\.brokerRoundTripAverage).max() ?? 0)
        metrics.rttP99.set(all.map(\.brokerRoundTripP99).max() ?? 0)
    }

    func producerConfiguration(for d: KafkaDestination) throws(KafkaError) -> ProducerConfiguration {
        var bootstrap = d.bootstrapServers
        if d.usesDevCluster {
            guard let data = FileManager.default.contents(atPath: devBootstrapFile),
                case let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines),
                !text.isEmpty
            else {
                throw KafkaError(
                    code: -1, name: "_DEV_CLUSTER_DOWN",
                    message: "the dev cluster is not running (no bootstrap file at \(devBootstrapFile))", isRetriable: true)
            }
            bootstrap = text
        }
        var configuration = ProducerConfiguration(destination: d, bootstrapServers: bootstrap)
        configuration.messageTimeout = messageTimeout
        return configuration
    }

    private func delivered(_ reports: [DeliveryReport]) {
        let outcomes: [(InFlight, DeliveryReport)] = state.withLockedValue { s in
            reports.compactMap { r in s.inFlight.removeValue(forKey: r.id).map { ($0, r) } }
        }
        var byPeer: [FramePeer: [Frame]] = [:]
        var failed = 0
        for (flight, report) in outcomes {
            let frame: Frame
            if let error = report.error {
                frame = .nack(flight.routerID, reason: error.description, retryable: error.isRetriable)
                failed += 1
            } else {
                frame = .ack(flight.routerID)
            }
            byPeer[flight.peer, default: []].append(frame)
        }
        for (peer, frames) in byPeer { peer.send(contentsOf: frames) }
        metrics.delivered.increment(by: Int64(outcomes.count - failed))
        if failed > 0 { metrics.failed.increment(by: Int64(failed)) }
    }
}

/// kafka-out's Prometheus metrics.
struct KafkaOutMetrics: Sendable {
    let delivered = Metrics.counter(
        "sluice_kafka_out_messages_total", "Messages Kafka confirmed (delivered) or reported failed.", [("outcome", "delivered")])
    let failed = Metrics.counter(
        "sluice_kafka_out_messages_total", "Messages Kafka confirmed (delivered) or reported failed.", [("outcome", "failed")])
    let producers = Metrics.gauge("sluice_kafka_out_producers", "Kafka producers open (one per cluster and credentials).")
    let queued = Metrics.gauge(
        "sluice_kafka_out_queue_messages", "Messages in librdkafka's queues, not yet confirmed (from its statistics).")
    let rttAverage = Metrics.gauge(
        "sluice_kafka_out_broker_rtt_average_seconds", "The slowest broker's average request round trip (librdkafka statistics).")
    let rttP99 = Metrics.gauge(
        "sluice_kafka_out_broker_rtt_p99_seconds", "The slowest broker's p99 request round trip (librdkafka statistics).")
}
