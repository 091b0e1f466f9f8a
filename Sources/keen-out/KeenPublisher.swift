import Foundation
import KafkaClient
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Observability
import Outputs
import ServiceLifecycle
import Shared

/// Serves the router's connection for Keen destinations. Each message is one Keen event for one
/// collection (the frame's `topic`). Kafka transport: produced to Keen's Kafka Inbound Cluster
/// (topic = collection) through the shared producer pool, acked on Kafka's confirmation. HTTP
/// transport: batched per destination into Keen's batch endpoint, acked per event from Keen's
/// per-event `success` flags.
final class KeenPublisher: FrameConnectionHandler, Service {
    private struct State {
        var destinations: [String: KeenDestination] = [:]
        var lanes: [String: HTTPLane] = [:]
        var router: FramePeer?
        var lastReported: [ProducerConfiguration: ContinuousClock.Instant] = [:]
    }

    private let state = NIOLockedValueBox(State())
    private let logger: Logger
    private let metrics = OutputMetrics(process: "keen_out")
    private let pool: ProducerPool<Delivery>
    private let httpTimeout: Duration

    init(httpTimeout: Duration = .seconds(30), logger: Logger) {
        self.logger = logger
        self.httpTimeout = httpTimeout
        let metrics = self.metrics
        let relay = WeakRelay<KeenPublisher>()
        pool = ProducerPool(
            logger: logger,
            onOutcomes: { outcomes in Delivery.answer(outcomes, metrics: metrics) },
            onStatistics: { all in metrics.record(all) },
            onError: { error, configuration in relay.target?.clientError(error, configuration: configuration) })
        relay.target = self
    }

    func run() async throws {
        try? await gracefulShutdown()
        let pool = self.pool
        let lanes = state.withLockedValue { Array($0.lanes.values) }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread {
                pool.flushAll(timeout: .seconds(10))
                for lane in lanes { lane.stop(drainFor: .seconds(10)) }
                c.resume()
            }
        }
        logger.info("keen-out stopped")
    }

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        switch frame.type {
        case .destination:
            guard let key = frame.destination else { throw FrameError.invalidFrame("destination frame without key") }
            guard let payload = frame.payload else {
                forget(key)
                return
            }
            let spec = try KeenDestination(wireJSON: try JSONValue.parse(payload))
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
        pool.forget { $0.peer == peer }
        for lane in state.withLockedValue({ Array($0.lanes.values) }) { lane.forget(peer) }
    }

    private func publish(_ frame: Frame, peer: FramePeer) async throws {
        guard let key = frame.destination, let payload = frame.payload, let collection = frame.topic else {
            throw FrameError.invalidFrame("Keen batch frame without destination, collection (topic) or payload")
        }
        guard let destination = state.withLockedValue({ $0.destinations[key] }) else {
            peer.send(.nack(frame.id, reason: "unknown destination \(key)", retryable: true))
            return
        }
        switch destination.transport {
        case .kafka:
            do throws(KafkaError) {
                let producer = try pool.producer(
                    for: ProducerConfiguration(keen: destination), metadata: ["destination": "\(key.split(separator: "#").first ?? "")"])
                metrics.producers.set(Double(pool.count))
                try await Delivery.produce(frame, payload: payload, topic: collection, producer: producer, pool: pool, peer: peer)
            } catch {
                peer.send(.nack(frame.id, reason: error.description, retryable: error.isRetriable))
            }
        case .http:
            let lane = state.withLockedValue { s in
                if let lane = s.lanes[key] { return lane }
                let lane = HTTPLane(destination: destination, timeout: httpTimeout, metrics: metrics, logger: logger)
                s.lanes[key] = lane
                return lane
            }
            await lane.add(HTTPLane.Item(peer: peer, routerID: frame.id, collection: collection, event: payload))
        }
    }

    private func forget(_ key: String) {
        let (needed, lane) = state.withLockedValue { s in
            s.destinations[key] = nil
            let lane = s.lanes.removeValue(forKey: key)
            return (Set(s.destinations.values.filter { $0.transport == .kafka }.map { ProducerConfiguration(keen: $0) }), lane)
        }
        pool.retain(needed)
        metrics.producers.set(Double(pool.count))
        if let lane { Thread.detachNewThread { lane.stop(drainFor: .seconds(30)) } }
    }

    private func clientError(_ error: KafkaError, configuration: ProducerConfiguration) {
        let (router, keys): (FramePeer?, [String]) = state.withLockedValue { s in
            let now = ContinuousClock.now
            if let last = s.lastReported[configuration], now - last < .seconds(5) { return (nil, []) }
            s.lastReported[configuration] = now
            let keys = s.destinations.filter { $0.value.transport == .kafka && ProducerConfiguration(keen: $0.value) == configuration }
            return (s.router, keys.map(\.key))
        }
        Delivery.report(error, for: keys, to: router)
    }
}
