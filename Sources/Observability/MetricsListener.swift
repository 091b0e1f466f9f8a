import Hummingbird
import Logging
import NIOCore

/// A small HTTP listener for the processes that have no HTTP port of their own (router, outputs):
/// `GET /metrics` (Prometheus text) and `GET /healthz`. Bind it to loopback unless a scraper on
/// another host needs it.
public func metricsListener(address: String, process: String, logger: Logger) throws -> some ApplicationProtocol {
    guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else {
        throw MetricsListenerError(description: "--metrics-listen must be HOST:PORT, not '\(address)'")
    }
    let router = Router()
    addObservabilityRoutes(to: router)
    return Application(
        router: router,
        configuration: .init(address: .hostname(String(address[..<colon]), port: port), serverName: "sluice-\(process)"),
        logger: logger)
}

/// `GET /metrics` and `GET /healthz` on an existing router (ingest serves them on its own port).
public func addObservabilityRoutes<Context: RequestContext>(to router: Router<Context>) {
    router.get("/metrics") { _, _ in
        Response(
            status: .ok, headers: [.contentType: Metrics.contentType],
            body: .init(byteBuffer: ByteBuffer(bytes: Metrics.text())))
    }
    router.get("/healthz") { _, _ in
        Response(status: .ok, headers: [.contentType: "text/plain"], body: .init(byteBuffer: ByteBuffer(string: "ok\n")))
    }
}

public struct MetricsListenerError: Error, CustomStringConvertible {
    public var description: String
}
