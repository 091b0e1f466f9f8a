import Foundation
import KafkaClient
import NIOConcurrencyHelpers
import NIOCore
import Shared

/// A message an output settles on its own (keen-out's HTTP lanes), and who waits for its outcome:
/// the router's frame id on the connection it came from — and, for a frame of several messages,
/// the tally that answers the frame once all of its messages are settled. Its static functions
/// hand a frame to Kafka as one group of the producer pool and answer the groups' outcomes; both
/// outputs use them.
public struct Delivery: Sendable {
    public var peer: FramePeer
    public var routerID: UInt64
    public var tally: FrameTally?
    public var index: Int

    public init(peer: FramePeer, routerID: UInt64, tally: FrameTally? = nil, index: Int = 0) {
        self.peer = peer
        self.routerID = routerID
        self.tally = tally
        self.index = index
    }

    /// The answer this message's outcome (nil: delivered) makes: its own ack or nack, or for a
    /// message of a several-message frame the frame's answer once it is the last one settled.
    public func answer(failure: (reason: String, retryable: Bool)?) -> Frame? {
        if let tally { return tally.record(index, failure: failure) }
        guard let failure else { return .ack(routerID) }
        return .nack(routerID, reason: failure.reason, retryable: failure.retryable)
    }

    /// The deliveries of a batch frame's messages, settled one by one (one tally for them when
    /// there are several), each with its payload and topic (the part's, else the frame's). For
    /// outputs that are not Kafka (keen-out's HTTP lanes); Kafka takes the frame whole (`produce`).
    public static func split(_ frame: Frame, from peer: FramePeer) throws(FrameError) -> [Message] {
        let messages = try frame.messages()
        let tally = frame.parts == nil ? nil : FrameTally(peer: peer, routerID: frame.id, count: messages.count)
        return messages.enumerated().map { i, m in
            Message(
                delivery: Delivery(peer: peer, routerID: frame.id, tally: tally, index: i), payload: m.payload,
                topic: m.part?.topic ?? frame.topic)
        }
    }

    /// One message of a batch frame, ready to hand on.
    public struct Message: Sendable {
        public var delivery: Delivery
        public var payload: ByteBuffer
        public var topic: String?
    }

    /// Hands a batch frame's messages to `producer` as one group of the pool (topic: `topic`, or
    /// when nil each part's own, else the frame's); the router gets one answer when all are settled. While
    /// librdkafka's queue is full it waits — and so stops reading from the router (backpressure).
    /// A message librdkafka refuses at once is settled as failed.
    public static func produce(
        _ frame: Frame, from peer: FramePeer, topic: String?, producer: KafkaProducer, pool: ProducerPool<FrameReply>
    ) async throws(FrameError) {
        let messages = try frame.messages()
        guard messages.count <= ProducerPool<FrameReply>.maxGroupSize else {
            throw .invalidFrame("a batch frame of \(messages.count) messages (at most \(ProducerPool<FrameReply>.maxGroupSize))")
        }
        if topic == nil, frame.topic == nil, messages.contains(where: { $0.part?.topic == nil }) {
            throw .invalidFrame("batch frame without a topic")
        }
        let headers = KafkaHeaders(frame.headers?.map { ($0.name, $0.value) } ?? [])
        let group = pool.begin(producer, count: messages.count, context: FrameReply(peer: peer, routerID: frame.id, several: frame.parts != nil))
        var key = frame.key
        // The topic handle of the last name looked up (kafka-out: the destination's, one for the
        // frame; keen-out: each part's collection, usually the same for a run of parts).
        var currentName: String?
        var current: KafkaTopic?
        for (index, m) in messages.enumerated() {
            while true {
                let failure: KafkaError?
                do throws(KafkaError) {
                    if current == nil || topic == nil {
                        let name = topic ?? m.part?.topic ?? frame.topic!
                        if current == nil || currentName != name {
                            current = try producer.topic(name)
                            currentName = name
                        }
                    }
                    try send(m.payload, eventID: m.part?.eventID, key: &key, topic: current!, headers: headers, id: group.id(index), producer)
                    failure = nil
                } catch { failure = error }
                guard let failure else { break }
                if failure.name == "_QUEUE_FULL", (try? await Task.sleep(for: .milliseconds(2))) != nil { continue }
                pool.refused(group, index: index, error: failure)
                break
            }
        }
    }

    private static let eventIDHeader: StaticString = "sluice-event-id"

    private static func send(
        _ payload: ByteBuffer, eventID: String?, key: inout String?, topic: KafkaTopic, headers: KafkaHeaders, id: UInt64,
        _ producer: KafkaProducer
    ) throws(KafkaError) {
        // The closures below return the error: `withUTF8` only rethrows untyped errors.
        let failure: KafkaError? = payload.withUnsafeReadableBytes { value in
            func with(key k: UnsafeRawBufferPointer?) -> KafkaError? {
                do throws(KafkaError) {
                    guard var eventID else {
                        try producer.produce(topic: topic, key: k, value: value, headers: headers, id: id)
                        return nil
                    }
                    let name = UnsafeRawPointer(eventIDHeader.utf8Start).assumingMemoryBound(to: CChar.self)
                    return eventID.withUTF8 { v in
                        do throws(KafkaError) {
                            try producer.produce(topic: topic, key: k, value: value, headers: headers, extra: (name, UnsafeRawBufferPointer(v)), id: id)
                            return nil
                        } catch { return error }
                    }
                } catch { return error }
            }
            guard key != nil else { return with(key: nil) }
            return key!.withUTF8 { with(key: UnsafeRawBufferPointer($0)) }
        }
        if let failure { throw failure }
    }

    /// Answers the router for each group's outcome: `ack` when every message was delivered, a
    /// `nack` (retryable or not) naming what failed else.
    public static func answer(_ outcomes: [ProducerPool<FrameReply>.Outcome], metrics: OutputMetrics) {
        var byPeer: [FramePeer: [Frame]] = [:]
        var delivered = 0
        var failed = 0
        for o in outcomes {
            failed += o.failures.count
            delivered += o.count - o.failures.count
            let frame = o.context.answer(o.failures.map { FailedPart(index: $0.index, reason: $0.error.description, retryable: $0.error.isRetriable) })
            byPeer[o.context.peer, default: []].append(frame)
        }
        for (peer, frames) in byPeer { peer.send(contentsOf: frames) }
        metrics.delivered.increment(by: Int64(delivered))
        if failed > 0 { metrics.failed.increment(by: Int64(failed)) }
    }

    /// A client-level error for some destinations, sent to the router so `status` shows it.
    public static func report(_ error: KafkaError, for keys: [String], to router: FramePeer?) {
        guard let router else { return }
        for key in keys {
            var frame = Frame.error(code: error.name, message: error.message)
            frame.destination = key
            router.send(frame)
        }
    }
}

/// Who waits for a batch frame's answer: the router's frame id on the connection it came from.
public struct FrameReply: Sendable {
    public var peer: FramePeer
    public var routerID: UInt64
    /// A several-message frame (with `parts`): a failure is answered naming its messages.
    public var several: Bool

    public init(peer: FramePeer, routerID: UInt64, several: Bool) {
        self.peer = peer
        self.routerID = routerID
        self.several = several
    }

    /// The frame's answer, given the messages that failed (none: `ack`).
    public func answer(_ failed: [FailedPart]) -> Frame {
        guard let first = failed.first else { return .ack(routerID) }
        return several ? .nack(routerID, failed: failed.sorted { $0.index < $1.index }) : .nack(routerID, reason: first.reason, retryable: first.retryable)
    }
}

/// The outcomes of one several-message frame's messages, gathered until all are settled; then
/// the router gets one answer: `ack`, or a `nack` listing the messages that failed. (Outputs that
/// settle messages one by one use it: keen-out's HTTP lanes; Kafka groups are tallied by the pool.)
public final class FrameTally: Sendable {
    public let reply: FrameReply
    private let state: NIOLockedValueBox<(remaining: Int, failed: [FailedPart])>

    public init(peer: FramePeer, routerID: UInt64, count: Int) {
        reply = FrameReply(peer: peer, routerID: routerID, several: true)
        state = NIOLockedValueBox((count, []))
    }

    /// Records message `index`'s outcome (nil: delivered); the frame's answer once all are in.
    public func record(_ index: Int, failure: (reason: String, retryable: Bool)?) -> Frame? {
        let done: [FailedPart]? = state.withLockedValue { s in
            if let failure { s.failed.append(FailedPart(index: index, reason: failure.reason, retryable: failure.retryable)) }
            s.remaining -= 1
            return s.remaining == 0 ? s.failed : nil
        }
        return done.map(reply.answer)
    }
}
