import CompressNIO
import Logging
import NIOCore
import NIOHTTP1
import Observability
import Shared

/// What ingest answers to one HTTP request: the status, the body and the few headers it sets.
struct HTTPAnswer: Sendable {
    var status: HTTPResponseStatus
    var contentType: String?
    var body = ByteBuffer()
    var retryAfterSeconds: Int?

    static let accepted = HTTPAnswer(status: .accepted)
    static let notFound = HTTPAnswer(status: .notFound)

    static func text(_ status: HTTPResponseStatus, _ text: String) -> HTTPAnswer {
        HTTPAnswer(status: status, contentType: "text/plain", body: ByteBuffer(string: text))
    }
}

/// The Events API: authenticate, read the body (gzip allowed), validate, hand on, answer. It knows
/// nothing of connections: `IngestServer` gives it a request's headers and whole body.
struct IngestAPI<Sink: BatchSink>: Sendable {
    let tenants: Tenants
    let settings: IngestSettings
    let sink: Sink
    let logger: Logger
    let metrics = IngestMetrics.shared

    /// Handles one POST to /v2/events (`bulk` false) or /v2/bulkevents. `answer` is called once:
    /// at once for a request refused before the sink, else when the sink has stored the batches
    /// (from the sink's thread).
    func handle(headers: HTTPHeaders, body: ByteBuffer, bulk: Bool, answer: @escaping @Sendable (HTTPAnswer) -> Void) {
        let stopwatch = Stopwatch()
        let metrics = self.metrics
        let finish: @Sendable (HTTPAnswer) -> Void = { response in
            stopwatch.record(into: metrics.duration(bulk: bulk))
            answer(response)
        }
        let tenant: String
        let batches: [ValidatedBatch]
        do {
            tenant = try tenants.authenticator.tenant(authorization: headers.first(name: "authorization"))
            let body = try decode(body, headers: headers)
            let validator = BatchValidator(maxBatchBytes: settings.maxBatchBytes)
            do {
                batches = bulk
                    ? try validator.validateBulk(body, maxBatches: settings.maxBatchesPerRequest)
                    : [try validator.validate(body)]
            } catch {
                throw error.isTooLarge ? APIError.tooLarge(error.message) : APIError.badRequest(error.message)
            }
        } catch {
            finish(refused(error))
            return
        }
        let logger = self.logger
        sink.submit(tenant: tenant, batches: batches) { outcome in
            switch outcome {
            case .accepted:
                metrics.batchesAccepted.increment(by: Int64(batches.count))
                metrics.eventsAccepted.increment(by: Int64(batches.reduce(0) { $0 + $1.eventCount }))
                metrics.bytesAccepted.increment(by: Int64(batches.reduce(0) { $0 + $1.bytes.readableBytes }))
                finish(.accepted)
            case .full(let retryAfter):
                logger.warning("spool full, client told to retry", metadata: ["tenant.id": "\(tenant)"])
                finish(refused(APIError.tooManyRequests(retryAfterSeconds: retryAfter)))
            case .unavailable(let why):
                logger.warning("batch not accepted, client will retry", metadata: ["tenant.id": "\(tenant)", "reason": "\(why)"])
                finish(refused(APIError.unavailable("cannot accept batches right now: \(why)")))
            }
        }
    }

    private func refused(_ error: any Error) -> HTTPAnswer {
        guard let error = error as? APIError else {
            metrics.rejected("INTERNAL_ERROR").increment()
            return APIError.internalError("unexpected error").answer
        }
        metrics.rejected(error.code).increment()
        return error.answer
    }

    /// The body as JSON bytes: its media type checked, gzip undone (within the request limit).
    private func decode(_ body: ByteBuffer, headers: HTTPHeaders) throws -> ByteBuffer {
        var body = body
        if let type = headers.first(name: "content-type") {
            let mediaType = HTTPToken.lowercased(HTTPToken.trimmed(type.split(separator: ";", maxSplits: 1).first ?? ""))
            guard mediaType == "application/json" || mediaType.hasSuffix("+json") else {
                throw APIError.unsupportedMediaType("Content-Type must be application/json, not \(mediaType)")
            }
        }
        let limit = settings.maxRequestBytes
        guard body.readableBytes <= limit else { throw APIError.tooLarge("the request body exceeds \(limit) bytes") }
        switch headers.first(name: "content-encoding").map({ HTTPToken.lowercased(HTTPToken.trimmed($0[...])) }) {
        case nil, "", "identity":
            return body
        case "gzip", "x-gzip":
            do {
                return try body.decompress(with: .gzip(), maxSize: limit)
            } catch let error as CompressNIOError where error == .bufferOverflow {
                throw APIError.tooLarge("the decompressed request body exceeds \(limit) bytes")
            } catch {
                throw APIError.badRequest("the request body is not valid gzip")
            }
        case let other?:
            throw APIError.unsupportedMediaType("Content-Encoding '\(other)' is not supported (use gzip or none)")
        }
    }
}

/// Header values as HTTP compares them: spaces and tabs around them do not count, and tokens
/// (media types, codings) are ASCII case-insensitive. On bytes: this runs for every request.
enum HTTPToken {
    static func trimmed(_ value: Substring) -> Substring { Substring(trimmed(value.utf8)) }

    /// The bytes without the spaces and tabs around them.
    static func trimmed<Bytes: BidirectionalCollection>(_ bytes: Bytes) -> Bytes.SubSequence where Bytes.Element == UInt8 {
        func blank(_ b: UInt8) -> Bool { b == UInt8(ascii: " ") || b == UInt8(ascii: "\t") }
        var start = bytes.startIndex
        var end = bytes.endIndex
        while start < end, blank(bytes[start]) { start = bytes.index(after: start) }
        while end > start, blank(bytes[bytes.index(before: end)]) { end = bytes.index(before: end) }
        return bytes[start..<end]
    }

    static func lowercased(_ value: Substring) -> String {
        guard value.utf8.contains(where: { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }) else { return String(value) }
        return String(decoding: value.utf8.map { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") ? $0 | 0x20 : $0 }, as: UTF8.self)
    }
}
