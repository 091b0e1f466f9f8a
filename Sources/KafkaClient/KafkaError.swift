import CRdKafka

/// A Kafka error with librdkafka's name for it and whether trying again can help.
public struct KafkaError: Error, CustomStringConvertible, Sendable, Equatable {
    /// librdkafka's `rd_kafka_resp_err_t` value.
    public var code: Int32
    /// librdkafka's name, e.g. `MSG_SIZE_TOO_LARGE` or `_MSG_TIMED_OUT`.
    public var name: String
    public var message: String
    public var isFatal: Bool
    public var isRetriable: Bool

    public init(code: Int32, name: String, message: String, isFatal: Bool = false, isRetriable: Bool) {
        self.code = code
        self.name = name
        self.message = message
        self.isFatal = isFatal
        self.isRetriable = isRetriable
    }

    init(_ err: rd_kafka_resp_err_t, message: String? = nil, isFatal: Bool = false) {
        self.code = err.rawValue
        self.name = String(cString: rd_kafka_err2name(err))
        self.message = message ?? String(cString: rd_kafka_err2str(err))
        self.isFatal = isFatal
        self.isRetriable = !isFatal && KafkaError.isRetriable(err)
    }

    /// Errors that no retry can fix: the message or the destination itself is wrong.
    static func isRetriable(_ err: rd_kafka_resp_err_t) -> Bool {
        switch err {
        case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, RD_KAFKA_RESP_ERR_INVALID_MSG, RD_KAFKA_RESP_ERR_INVALID_MSG_SIZE,
            RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE, RD_KAFKA_RESP_ERR_INVALID_RECORD, RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION,
            RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS, RD_KAFKA_RESP_ERR__INVALID_ARG,
            RD_KAFKA_RESP_ERR_UNSUPPORTED_FOR_MESSAGE_FORMAT,
            // The topic is rejected: it does not exist (after librdkafka waited for it to appear,
            // topic.metadata.propagation.max.ms) or we may not write to it. Dead-lettered, and
            // replayable once the topic exists or the ACL is fixed.
            RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC, RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
            RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
            return false
        default:
            return true
        }
    }

    public var description: String { "\(name): \(message)" }

    /// A configuration error found before any broker was contacted.
    public static func configuration(_ message: String) -> KafkaError {
        KafkaError(code: RD_KAFKA_RESP_ERR__INVALID_ARG.rawValue, name: "_INVALID_ARG", message: message, isRetriable: false)
    }
}

/// The text in a C error buffer.
func errorText(_ buffer: [CChar]) -> String {
    buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}
