import CRdKafka
import Foundation
import Logging

/// The outcome of one produced message, matched to its send by `id`.
public struct DeliveryReport: Sendable {
    public var id: UInt64
    public var error: KafkaError?
    public var partition: Int32
    public var offset: Int64
}

/// One librdkafka producer. Its own thread serves librdkafka's event queue (delivery reports, logs,
/// errors), so no librdkafka thread ever calls into Swift. Delivery reports are matched to sends by
/// the id carried in the message's opaque pointer.
public final class KafkaProducer: @unchecked Sendable {
    private let handle: OpaquePointer
    private let events: EventQueue
    private let lock = NSLock()
    private var topics: [String: OpaquePointer] = [:]
    public let configuration: ProducerConfiguration

    public init(
        configuration: ProducerConfiguration, logger: Logger,
        onStatistics: (@Sendable (ProducerStatistics) -> Void)? = nil,
        onError: (@Sendable (KafkaError) -> Void)? = nil,
        onDelivery: @escaping @Sendable ([DeliveryReport]) -> Void
    ) throws(KafkaError) {
        self.configuration = configuration
        let conf = rd_kafka_conf_new()!
        var errstr = [CChar](repeating: 0, count: 512)
        for (key, value) in configuration.properties {
            if rd_kafka_conf_set(conf, key, value, &errstr, errstr.count) != RD_KAFKA_CONF_OK {
                rd_kafka_conf_destroy(conf)
                let shown = ProducerConfiguration.secretProperties.contains(key) ? "<redacted>" : value
                throw .configuration("librdkafka rejected \(key)=\(shown): \(errorText(errstr))")
            }
        }
        rd_kafka_conf_set_events(conf, RD_KAFKA_EVENT_DR | RD_KAFKA_EVENT_LOG | RD_KAFKA_EVENT_ERROR | RD_KAFKA_EVENT_STATS)
        guard let rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, &errstr, errstr.count) else {
            // On failure the configuration object is still ours.
            rd_kafka_conf_destroy(conf)
            throw .configuration("cannot create a Kafka producer: \(errorText(errstr))")
        }
        handle = rk
        let queue = rd_kafka_queue_get_main(rk)!
        rd_kafka_set_log_queue(rk, queue)
        events = EventQueue(queue: queue, logger: logger, onStatistics: onStatistics, onError: onError, onDelivery: onDelivery)
        events.start()
    }

    deinit {
        events.stop()
        for (_, rkt) in topics { rd_kafka_topic_destroy(rkt) }
        rd_kafka_queue_destroy(events.queue)
        rd_kafka_destroy(handle)
    }

    /// A fatal error (e.g. the idempotent producer lost its state): this producer can send no more.
    public var fatalError: KafkaError? { events.fatalError }

    /// Messages handed to librdkafka and not yet reported.
    public var outstanding: Int { Int(rd_kafka_outq_len(handle)) }

    /// Hands one message to librdkafka (copied). Throws `_QUEUE_FULL` (retriable) when librdkafka's
    /// queue is full: wait for deliveries and try again.
    public func produce(
        topic: String, key: UnsafeRawBufferPointer?, value: UnsafeRawBufferPointer,
        headers: [(name: String, value: String)] = [], id: UInt64
    ) throws(KafkaError) {
        try produce(topic: self.topic(topic), key: key, value: value, headers: KafkaHeaders(headers), id: id)
    }

    /// Hands one message to librdkafka (copied), with `headers` and, when given, one more header
    /// (`extra`: a NUL-terminated name and the value's bytes) — without allocating: the path every
    /// message of a frame takes. Throws `_QUEUE_FULL` (retriable) when librdkafka's queue is full.
    public func produce(
        topic: KafkaTopic, key: UnsafeRawBufferPointer?, value: UnsafeRawBufferPointer, headers: KafkaHeaders,
        extra: (name: UnsafePointer<CChar>, value: UnsafeRawBufferPointer)? = nil, id: UInt64
    ) throws(KafkaError) {
        precondition(topic.producer == ObjectIdentifier(self), "a topic of another producer")
        let count = 5 + headers.count + (extra == nil ? 0 : 1)
        let err: OpaquePointer? = withUnsafeTemporaryAllocation(of: rd_kafka_vu_t.self, capacity: count) { vus in
            vus.initialize(repeating: rd_kafka_vu_t())
            vus[0].vtype = RD_KAFKA_VTYPE_RKT
            vus[0].u.rkt = topic.handle
            vus[1].vtype = RD_KAFKA_VTYPE_VALUE
            vus[1].u.mem.ptr = UnsafeMutableRawPointer(mutating: value.baseAddress)
            vus[1].u.mem.size = value.count
            vus[2].vtype = RD_KAFKA_VTYPE_KEY
            vus[2].u.mem.ptr = key.flatMap { UnsafeMutableRawPointer(mutating: $0.baseAddress) }
            vus[2].u.mem.size = key?.count ?? 0
            vus[3].vtype = RD_KAFKA_VTYPE_OPAQUE
            vus[3].u.ptr = UnsafeMutableRawPointer(bitPattern: UInt(id))
            vus[4].vtype = RD_KAFKA_VTYPE_MSGFLAGS
            vus[4].u.i = RD_KAFKA_MSG_F_COPY
            var n = 5
            for i in 0..<headers.count {
                vus[n].vtype = RD_KAFKA_VTYPE_HEADER
                vus[n].u.header.name = UnsafePointer(headers.names[i])
                vus[n].u.header.val = UnsafeRawPointer(headers.values[i])
                vus[n].u.header.size = headers.sizes[i]
                n += 1
            }
            if let extra {
                vus[n].vtype = RD_KAFKA_VTYPE_HEADER
                vus[n].u.header.name = extra.name
                // librdkafka reads `size` bytes; a null value pointer would mean a null header.
                vus[n].u.header.val = extra.value.baseAddress ?? UnsafeRawPointer(extra.name)
                vus[n].u.header.size = extra.value.count
            }
            return rd_kafka_produceva(handle, vus.baseAddress, count)
        }
        if let err {
            let code = rd_kafka_error_code(err)
            let message = String(cString: rd_kafka_error_string(err))
            let fatal = rd_kafka_error_is_fatal(err) != 0
            rd_kafka_error_destroy(err)
            throw KafkaError(code, message: message, isFatal: fatal)
        }
    }

    /// The topic `name` of this producer (created on first use, kept while the producer lives).
    public func topic(_ name: String) throws(KafkaError) -> KafkaTopic {
        lock.lock()
        defer { lock.unlock() }
        if let t = topics[name] { return KafkaTopic(handle: t, producer: ObjectIdentifier(self)) }
        guard let t = rd_kafka_topic_new(handle, name, nil) else {
            throw KafkaError(rd_kafka_last_error(), message: "cannot use topic '\(name)'")
        }
        topics[name] = t
        return KafkaTopic(handle: t, producer: ObjectIdentifier(self))
    }

    /// Waits (blocking this thread) until everything handed over is delivered or `timeout` passes.
    /// Returns the number of messages still outstanding.
    @discardableResult
    public func flush(timeout: Duration) -> Int {
        _ = rd_kafka_flush(handle, Int32(ProducerConfiguration.milliseconds(timeout)) ?? 0)
        return outstanding
    }
}

/// Serves a producer's librdkafka event queue on a thread of its own. It holds no reference to the
/// producer, so the producer can stop it from its deinit.
final class EventQueue: @unchecked Sendable {
    let queue: OpaquePointer
    private let logger: Logger
    private let onDelivery: @Sendable ([DeliveryReport]) -> Void
    private let onStatistics: (@Sendable (ProducerStatistics) -> Void)?
    private let onError: (@Sendable (KafkaError) -> Void)?
    private let lock = NSLock()
    private var stopping = false
    private var fatal: KafkaError?
    private let stopped = DispatchSemaphore(value: 0)

    init(
        queue: OpaquePointer, logger: Logger, onStatistics: (@Sendable (ProducerStatistics) -> Void)?,
        onError: (@Sendable (KafkaError) -> Void)?, onDelivery: @escaping @Sendable ([DeliveryReport]) -> Void
    ) {
        self.queue = queue
        self.onStatistics = onStatistics
        self.onError = onError
        self.logger = logger
        self.onDelivery = onDelivery
    }

    var fatalError: KafkaError? { lock.withLock { fatal } }

    func start() {
        let thread = Thread { self.run() }
        thread.name = "kafka-events"
        thread.start()
    }

    /// Stops the thread and waits until it has.
    func stop() {
        lock.withLock { stopping = true }
        stopped.wait()
    }

    private func run() {
        var reports: [DeliveryReport] = []
        while !lock.withLock({ stopping }) {
            guard let event = rd_kafka_queue_poll(queue, 100) else { continue }
            switch Int32(rd_kafka_event_type(event)) {
            case RD_KAFKA_EVENT_DR:
                reports.removeAll(keepingCapacity: true)
                while let message = rd_kafka_event_message_next(event) {
                    let m = message.pointee
                    // Not rd_kafka_message_errstr: for a producer's message it returns the payload.
                    let error: KafkaError? = m.err == RD_KAFKA_RESP_ERR_NO_ERROR ? nil : KafkaError(m.err)
                    reports.append(
                        DeliveryReport(
                            id: UInt64(UInt(bitPattern: m._private)), error: error, partition: m.partition, offset: m.offset))
                }
                if !reports.isEmpty { onDelivery(reports) }
            case RD_KAFKA_EVENT_LOG:
                var facility: UnsafePointer<CChar>?
                var text: UnsafePointer<CChar>?
                var level: Int32 = 0
                rd_kafka_event_log(event, &facility, &text, &level)
                let message = text.map { String(cString: $0) } ?? ""
                logger.log(
                    level: Self.level(syslog: level), "librdkafka",
                    metadata: ["kafka.facility": "\(facility.map { String(cString: $0) } ?? "")", "kafka.log": "\(message)"])
            case RD_KAFKA_EVENT_ERROR:
                let err = rd_kafka_event_error(event)
                let isFatal = rd_kafka_event_error_is_fatal(event) != 0
                let error = KafkaError(err, message: String(cString: rd_kafka_event_error_string(event)), isFatal: isFatal)
                if isFatal { lock.withLock { fatal = error } }
                onError?(error)
                logger.log(
                    level: isFatal ? .error : .warning, "kafka client error",
                    metadata: ["kafka.error": "\(error.name)", "kafka.message": "\(error.message)", "kafka.fatal": "\(isFatal)"])
            case RD_KAFKA_EVENT_STATS:
                if let onStatistics, let json = rd_kafka_event_stats(event),
                    let stats = ProducerStatistics(json: Data(bytes: json, count: strlen(json)))
                {
                    onStatistics(stats)
                }
            default:
                break
            }
            rd_kafka_event_destroy(event)
        }
        stopped.signal()
    }

    static func level(syslog: Int32) -> Logger.Level {
        switch syslog {
        case ...3: return .error
        case 4: return .warning
        case 5: return .notice
        case 6: return .info
        default: return .debug
        }
    }
}

/// A topic of one producer (librdkafka's handle, valid while the producer lives), looked up once
/// for many messages. Use it only with the producer it came from, while holding that producer.
public struct KafkaTopic: @unchecked Sendable {
    let handle: OpaquePointer
    let producer: ObjectIdentifier
}

/// Message headers as C strings, made once and used for every message of a frame.
public final class KafkaHeaders: @unchecked Sendable {
    let names: [UnsafeMutablePointer<CChar>]
    let values: [UnsafeMutablePointer<CChar>]
    let sizes: [Int]
    public var count: Int { names.count }

    public init(_ headers: [(name: String, value: String)]) {
        names = headers.map { Self.copy($0.name) }
        values = headers.map { Self.copy($0.value) }
        sizes = headers.map { $0.value.utf8.count }
    }

    /// The string's bytes (all of them, even after a NUL) and a terminating NUL.
    private static func copy(_ text: String) -> UnsafeMutablePointer<CChar> {
        let bytes = Array(text.utf8)
        let out = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count + 1)
        for (i, b) in bytes.enumerated() { out[i] = CChar(bitPattern: b) }
        out[bytes.count] = 0
        return out
    }

    deinit {
        names.forEach { $0.deallocate() }
        values.forEach { $0.deallocate() }
    }
}
