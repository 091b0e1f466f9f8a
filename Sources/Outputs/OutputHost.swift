import Foundation
import KafkaClient
import Logging
import NIOCore
import NIOConcurrencyHelpers
import Shared

/// What every output process keeps of its router connection, and the frames it handles the same
/// way: the destinations it was told about (by key; a `destination` frame without settings means
/// forget it), the shared producer pool (producers nothing uses any more are closed), client
/// errors reported to the router per destination (at most every 5 s per cluster), and the flush on
/// shutdown. The output itself only publishes batches.
public final class OutputHost<Spec: Sendable>: Sendable {
    private struct State {
        var destinations: [String: Spec] = [:]
        var router: FramePeer?
        var lastReported: [ProducerConfiguration: ContinuousClock.Instant] = [:]
    }

    public let pool: ProducerPool<FrameReply>
    public let metrics: OutputMetrics
    private let state = NIOLockedValueBox(State())
    private let logger: Logger
    private let decode: @Sendable (JSONValue) throws -> Spec
    private let configuration: @Sendable (Spec) -> ProducerConfiguration?
    private let forgotten: @Sendable (String) -> Void

    /// `configuration`: the producer a destination uses (nil: none, e.g. Keen over HTTP).
    /// `forgotten`: called after a destination is forgotten (for the output's own resources).
    public init(
        process: String, logger: Logger, decode: @escaping @Sendable (JSONValue) throws -> Spec,
        configuration: @escaping @Sendable (Spec) -> ProducerConfiguration?,
        forgotten: @escaping @Sendable (String) -> Void = { _ in },
        eventLoop: EventLoop? = nil
    ) {
        let metrics = OutputMetrics(process: process)
        self.metrics = metrics
        self.logger = logger
        self.decode = decode
        self.configuration = configuration
        self.forgotten = forgotten
        let relay = WeakRelay<OutputHost<Spec>>()
        pool = ProducerPool(
            logger: logger,
            onOutcomes: { outcomes in Delivery.answer(outcomes, metrics: metrics) },
            onStatistics: { all in metrics.record(all) },
            onError: { error, configuration in relay.target?.clientError(error, configuration: configuration) },
            eventLoop: eventLoop)
        relay.target = self
    }

    public func destination(_ key: String) -> Spec? { state.withLockedValue { $0.destinations[key] } }

    /// Handles `destination`, `error` and unexpected frames; returns a `batch` frame for the output.
    public func handle(_ frame: Frame, from peer: FramePeer) throws -> Frame? {
        switch frame.type {
        case .batch:
            return frame
        case .destination:
            guard let key = frame.destination else { throw FrameError.invalidFrame("destination frame without key") }
            guard let payload = frame.payload else {
                forget(key)  // the router no longer uses it (a reload changed or removed it)
                return nil
            }
            let spec = try decode(try JSONValue.parse(payload))
            state.withLockedValue {
                $0.destinations[key] = spec
                $0.router = peer
            }
        case .error:
            logger.warning("router reported an error", metadata: ["error.code": "\(frame.code ?? "")", "error": "\(frame.message ?? "")"])
        case .hello, .ack, .nack, .outputs, .status:
            throw FrameError.invalidFrame("unexpected \(frame.type.rawValue) frame")
        }
        return nil
    }

    /// The router connection is gone: it sends again what it had not seen confirmed.
    public func disconnected(_ peer: FramePeer) {
        pool.forget { $0.peer == peer }
    }

    /// The producer for a destination (created on first use), counted in the metrics.
    public func producer(for configuration: ProducerConfiguration, key: String) throws(KafkaError) -> KafkaProducer {
        // Per frame: no metadata built, no gauge set, unless a producer is made.
        if let producer = pool.existing(configuration) { return producer }
        let producer = try pool.producer(for: configuration, metadata: ["destination": "\(key.split(separator: "#").first ?? "")"])
        metrics.producers.set(Double(pool.count))
        return producer
    }

    /// Waits (off the cooperative pool) until the producers delivered what they hold, up to 10 s,
    /// after running `also` on the same thread.
    public func flushOnShutdown(also: @escaping @Sendable () -> Void = {}) async {
        let pool = self.pool
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread {
                pool.flushAll(timeout: .seconds(10))
                also()
                c.resume()
            }
        }
    }

    private func forget(_ key: String) {
        let configuration = self.configuration
        let needed = state.withLockedValue { s in
            s.destinations[key] = nil
            return Set(s.destinations.values.compactMap(configuration))
        }
        let closed = pool.retain(needed)
        metrics.producers.set(Double(pool.count))
        if closed > 0 { logger.info("closing producers no destination uses", metadata: ["producers": "\(closed)"]) }
        forgotten(key)
    }

    private func clientError(_ error: KafkaError, configuration: ProducerConfiguration) {
        let configurationOf = self.configuration
        let (router, keys): (FramePeer?, [String]) = state.withLockedValue { s in
            let now = ContinuousClock.now
            if let last = s.lastReported[configuration], now - last < .seconds(5) { return (nil, []) }
            s.lastReported[configuration] = now
            return (s.router, s.destinations.filter { configurationOf($0.value) == configuration }.map(\.key))
        }
        Delivery.report(error, for: keys, to: router)
    }
}
