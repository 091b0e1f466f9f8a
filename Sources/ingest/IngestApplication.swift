import CompressNIO
import Hummingbird
import Logging
import NIOCore
import NIOPosix
import Observability
import Shared

/// Builds ingest's HTTP application. `IngestCommand` runs it; tests drive the same one.
func buildApplication(
    config: SluiceConfig, tenants: Tenants? = nil, sink: some BatchSink, eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
    logger: Logger
) -> some ApplicationProtocol {
    let router = Router()
    let api = IngestAPI(tenants: tenants ?? Tenants(config), settings: config.ingest, sink: sink, logger: logger)
    router.post("/v2/events") { request, _ in await api.handle(request, bulk: false) }
    router.post("/v2/bulkevents") { request, _ in await api.handle(request, bulk: true) }
    addObservabilityRoutes(to: router)
    IngestMetrics.shared.spoolLimit.set(Double(config.ingest.spoolMaxBytes))
    Metrics.onScrape { IngestMetrics.shared.ready.set(to: sink.isReady ? 1.0 : 0.0) }
    router.get("/readyz") { _, _ in
        sink.isReady
            ? Response(status: .ok, headers: [.contentType: "text/plain"], body: .init(byteBuffer: ByteBuffer(string: "ready\n")))
            : APIError.unavailable("not ready: the router is not connected or the spool is full").response
    }
    return Application(
        router: router,
        // A connection that sends nothing for 30 s is closed (slow or stuck clients hold no resources).
        server: .http1(configuration: .init(idleTimeout: .seconds(30))),
        configuration: .init(address: .hostname(config.ingest.host, port: config.ingest.port), serverName: "sluice-ingest"),
        eventLoopGroupProvider: .shared(eventLoopGroup),
        logger: logger)
}

/// The Events API handlers: authenticate, read the body (gzip allowed), validate, hand on, answer.
struct IngestAPI<Sink: BatchSink>: Sendable {
    let tenants: Tenants
    let settings: IngestSettings
    let sink: Sink
    let logger: Logger
    let metrics = IngestMetrics.shared

    func handle(_ request: Request, bulk: Bool) async -> Response {
        let stopwatch = Stopwatch()
        defer { stopwatch.record(into: metrics.duration(bulk: bulk)) }
        do {
            let tenant = try tenants.authenticator.tenant(authorization: request.headers[.authorization])
            let body = try await readBody(request)
            let validator = BatchValidator(maxBatchBytes: settings.maxBatchBytes)
            let batches: [ValidatedBatch]
            do {
                batches = bulk
                    ? try validator.validateBulk(body, maxBatches: settings.maxBatchesPerRequest)
                    : [try validator.validate(body)]
            } catch {
                throw error.isTooLarge ? APIError.tooLarge(error.message) : APIError.badRequest(error.message)
            }
            switch await sink.submit(tenant: tenant, batches: batches) {
            case .accepted:
                metrics.batchesAccepted.increment(by: Int64(batches.count))
                metrics.eventsAccepted.increment(by: Int64(batches.reduce(0) { $0 + $1.eventCount }))
                metrics.bytesAccepted.increment(by: Int64(batches.reduce(0) { $0 + $1.bytes.readableBytes }))
                return Response(status: .accepted)
            case .full(let retryAfter):
                logger.warning("spool full, client told to retry", metadata: ["tenant.id": "\(tenant)"])
                throw APIError.tooManyRequests(retryAfterSeconds: retryAfter)
            case .unavailable(let why):
                logger.warning("batch not accepted, client will retry", metadata: ["tenant.id": "\(tenant)", "reason": "\(why)"])
                throw APIError.unavailable("cannot accept batches right now: \(why)")
            }
        } catch let error as APIError {
            metrics.rejected(error.code).increment()
            return error.response
        } catch {
            metrics.rejected("INTERNAL_ERROR").increment()
            return APIError.internalError("unexpected error").response
        }
    }

    private func readBody(_ request: Request) async throws -> ByteBuffer {
        if let type = request.headers[.contentType] {
            let mediaType = type.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
            guard mediaType == "application/json" || mediaType.hasSuffix("+json") else {
                throw APIError.unsupportedMediaType("Content-Type must be application/json, not \(mediaType)")
            }
        }
        let limit = settings.maxRequestBytes
        var body: ByteBuffer
        do {
            body = try await request.body.collect(upTo: limit)
        } catch {
            throw APIError.tooLarge("the request body exceeds \(limit) bytes")
        }
        switch request.headers[.contentEncoding]?.lowercased().trimmingCharacters(in: .whitespaces) {
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
