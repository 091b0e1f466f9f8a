import CompressNIO
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Shared
import XCTest

@testable import ingest

/// A sink that records what it was given and answers as told.
final class FakeSink: BatchSink {
    let box = NIOLockedValueBox<(submissions: [(tenant: String, batches: [ValidatedBatch])], outcome: SubmitOutcome, ready: Bool)>(
        ([], .accepted, true))
    var isReady: Bool { box.withLockedValue { $0.ready } }
    var submissions: [(tenant: String, batches: [ValidatedBatch])] { box.withLockedValue { $0.submissions } }
    func set(outcome: SubmitOutcome, ready: Bool = true) { box.withLockedValue { $0.outcome = outcome; $0.ready = ready } }
    func submit(tenant: String, batches: [ValidatedBatch], completion: @escaping @Sendable (SubmitOutcome) -> Void) {
        let outcome = box.withLockedValue { s in
            s.submissions.append((tenant, batches))
            return s.outcome
        }
        // From another thread, as the spool's writer answers.
        DispatchQueue.global().async { completion(outcome) }
    }
}

/// A response as the tests read it.
struct Answer: Sendable {
    var status: HTTPResponse.Status
    var headers: HTTPFields
    var body: ByteBuffer
}

/// Requests to a live `IngestServer`, each on a new connection (a 413 for an oversized body
/// closes its connection).
struct LiveClient: Sendable {
    let port: Int

    func execute(uri: String, method: HTTPRequest.Method, headers: HTTPFields = [:], body: ByteBuffer? = nil) async throws -> Answer {
        var headers = headers
        if let body { headers[.contentLength] = String(body.readableBytes) }
        let client = TestClient(host: "127.0.0.1", port: port)
        client.connect()
        defer { Task { try? await client.shutdown() } }
        let response = try await client.execute(TestClient.Request(uri, method: method, authority: "localhost", headers: headers, body: body))
        return Answer(status: response.status, headers: response.headers, body: response.body ?? ByteBuffer())
    }
}

final class IngestHTTPTests: XCTestCase, @unchecked Sendable {
    let yaml = """
        ingest:
          max_batch_bytes: 2048
          max_request_bytes: 4096
          max_batches_per_request: 3
        tenants:
          acme: {api_key: acme-key, api_secret: acme-secret}
          other: {api_key: other-key, api_secret: other-secret}
        """

    let batch = #"{"environment":"production","mpid":-9223372036854775808,"events":[{"event_type":"custom_event","data":{"event_name":"x"}}]}"#

    func basic(_ user: String, _ password: String) -> String {
        "Basic " + Data("\(user):\(password)".utf8).base64EncodedString()
    }

    /// Runs `body` against a live server on a free loopback port.
    func withApp(
        _ sink: FakeSink = FakeSink(), idleTimeout: TimeAmount = .seconds(30), _ body: @Sendable (LiveClient, FakeSink) async throws -> Void
    ) async throws {
        var config = try SluiceConfig.parse(yaml: yaml)
        config.ingest.host = "127.0.0.1"
        config.ingest.port = 0
        let server = IngestServer(config: config, sink: sink, idleTimeout: idleTimeout, logger: Logger(label: "test"))
        let running = Task { try await server.run() }
        defer { running.cancel() }
        let port = try await server.boundPort()
        try await body(LiveClient(port: port), sink)
    }

    func post(
        _ client: LiveClient, _ path: String = "/v2/events", auth: String? = nil, body: String,
        headers extra: HTTPFields = [:]
    ) async throws -> Answer {
        var headers: HTTPFields = [.contentType: "application/json"]
        for field in extra { headers[field.name] = field.value }
        if let auth { headers[.authorization] = auth }
        return try await client.execute(uri: path, method: .post, headers: headers, body: ByteBuffer(string: body))
    }

    func errorMessage(_ response: Answer) throws -> (code: String, message: String) {
        XCTAssertEqual(response.headers[.contentType], "application/json")
        let json = try JSONValue.parse(response.body)
        let first = json["errors"]?.arrayValue?.first
        return (first?["code"]?.stringValue ?? "", first?["message"]?.stringValue ?? "")
    }

    func testAcceptsABatchForTheAuthenticatedTenant() async throws {
        try await withApp { client, sink in
            let response = try await self.post(client, auth: self.basic("acme-key", "acme-secret"), body: self.batch)
            XCTAssertEqual(response.status, .accepted)
            XCTAssertEqual(sink.submissions.count, 1)
            XCTAssertEqual(sink.submissions[0].tenant, "acme")
            XCTAssertEqual(String(buffer: sink.submissions[0].batches[0].bytes), self.batch, "the batch is handed on byte for byte")
            XCTAssertEqual(sink.submissions[0].batches[0].mpid, "-9223372036854775808")
            // The other tenant's key writes only into the other tenant.
            _ = try await self.post(client, auth: self.basic("other-key", "other-secret"), body: self.batch)
            XCTAssertEqual(sink.submissions[1].tenant, "other")
        }
    }

    func testAuthentication() async throws {
        try await withApp { client, sink in
            var r = try await self.post(client, body: self.batch)
            XCTAssertEqual(r.status, .unauthorized)
            XCTAssertEqual(try self.errorMessage(r).code, "UNAUTHORIZED")
            r = try await self.post(client, auth: "Bearer abc", body: self.batch)
            XCTAssertEqual(r.status, .unauthorized)
            r = try await self.post(client, auth: "Basic !!!notbase64", body: self.batch)
            XCTAssertEqual(r.status, .unauthorized)
            r = try await self.post(client, auth: self.basic("acme-key", "wrong"), body: self.batch)
            XCTAssertEqual(r.status, .forbidden)
            XCTAssertEqual(try self.errorMessage(r).code, "FORBIDDEN")
            r = try await self.post(client, auth: self.basic("nobody", "acme-secret"), body: self.batch)
            XCTAssertEqual(r.status, .forbidden)
            // Another tenant's secret with this tenant's key is wrong too.
            r = try await self.post(client, auth: self.basic("acme-key", "other-secret"), body: self.batch)
            XCTAssertEqual(r.status, .forbidden)
            XCTAssertTrue(sink.submissions.isEmpty)
        }
    }

    func testMalformedAndInvalidBatchesAre400WithTheField() async throws {
        try await withApp { client, sink in
            let auth = self.basic("acme-key", "acme-secret")
            for (body, expected) in [
                ("{not json", "is not a JSON object"),
                (#"{"events":[]}"#, "\"environment\" is missing"),
                (#"{"environment":"production","events":[{"event_type":"bogus","data":{}}]}"#, "unknown event_type"),
                (#"{"environment":"production","mpid":1.5}"#, "\"mpid\""),
            ] {
                let r = try await self.post(client, auth: auth, body: body)
                XCTAssertEqual(r.status, .badRequest, body)
                let e = try self.errorMessage(r)
                XCTAssertEqual(e.code, "BAD_REQUEST")
                XCTAssertTrue(e.message.contains(expected), "\(body): \(e.message)")
            }
            XCTAssertTrue(sink.submissions.isEmpty)
        }
    }

    func testSizeLimitsAre413() async throws {
        try await withApp { client, sink in
            let auth = self.basic("acme-key", "acme-secret")
            let bigBatch = #"{"environment":"production","pad":""# + String(repeating: "x", count: 2100) + "\"}"
            var r = try await self.post(client, auth: auth, body: bigBatch)
            XCTAssertEqual(r.status, .contentTooLarge)
            XCTAssertEqual(try self.errorMessage(r).code, "PAYLOAD_TOO_LARGE")
            let bigRequest = #"{"environment":"production","pad":""# + String(repeating: "x", count: 5000) + "\"}"
            r = try await self.post(client, auth: auth, body: bigRequest)
            XCTAssertEqual(r.status, .contentTooLarge)
            XCTAssertTrue(sink.submissions.isEmpty)
        }
    }

    func testMediaTypes() async throws {
        try await withApp { client, _ in
            let auth = self.basic("acme-key", "acme-secret")
            var r = try await self.post(client, auth: auth, body: self.batch, headers: [.contentType: "text/plain"])
            XCTAssertEqual(r.status, .unsupportedMediaType)
            XCTAssertEqual(try self.errorMessage(r).code, "UNSUPPORTED_MEDIA_TYPE")
            r = try await self.post(client, auth: auth, body: self.batch, headers: [.contentEncoding: "br"])
            XCTAssertEqual(r.status, .unsupportedMediaType)
            r = try await self.post(client, auth: auth, body: self.batch, headers: [.contentType: "application/json; charset=utf-8"])
            XCTAssertEqual(r.status, .accepted)
        }
    }

    func testGzipBodies() async throws {
        try await withApp { client, sink in
            let auth = self.basic("acme-key", "acme-secret")
            var plain = ByteBuffer(string: self.batch)
            let gz = try plain.compress(with: .gzip())
            var headers: HTTPFields = [.contentType: "application/json", .contentEncoding: "gzip", .authorization: auth]
            var r = try await client.execute(uri: "/v2/events", method: .post, headers: headers, body: gz)
            XCTAssertEqual(r.status, .accepted)
            XCTAssertEqual(String(buffer: sink.submissions.last!.batches[0].bytes), self.batch)
            // A small body that inflates past the request limit is refused, not inflated without bound.
            var bomb = ByteBuffer(string: #"{"environment":"production","pad":""# + String(repeating: "x", count: 100_000) + "\"}")
            let bombGz = try bomb.compress(with: .gzip())
            XCTAssertLessThan(bombGz.readableBytes, 4096)
            r = try await client.execute(uri: "/v2/events", method: .post, headers: headers, body: bombGz)
            XCTAssertEqual(r.status, .contentTooLarge)
            r = try await client.execute(uri: "/v2/events", method: .post, headers: headers, body: ByteBuffer(string: "not gzip"))
            XCTAssertEqual(r.status, .badRequest)
            headers[.contentEncoding] = nil
        }
    }

    func testBulk() async throws {
        try await withApp { client, sink in
            let auth = self.basic("acme-key", "acme-secret")
            var r = try await self.post(client, "/v2/bulkevents", auth: auth, body: "[\(self.batch),\(self.batch)]")
            XCTAssertEqual(r.status, .accepted)
            XCTAssertEqual(sink.submissions.last?.batches.count, 2)
            // One bad batch inside: nothing of the request is accepted.
            let before = sink.submissions.count
            r = try await self.post(client, "/v2/bulkevents", auth: auth, body: "[\(self.batch),{\"mpid\":1}]")
            XCTAssertEqual(r.status, .badRequest)
            XCTAssertTrue(try self.errorMessage(r).message.contains("batch [1]"))
            r = try await self.post(client, "/v2/bulkevents", auth: auth, body: "[\(self.batch),\(self.batch),\(self.batch),\(self.batch)]")
            XCTAssertEqual(r.status, .badRequest)
            XCTAssertTrue(try self.errorMessage(r).message.contains("at most 3"))
            r = try await self.post(client, "/v2/bulkevents", auth: auth, body: self.batch)
            XCTAssertEqual(r.status, .badRequest)
            XCTAssertEqual(sink.submissions.count, before)
        }
    }

    func testUnavailableIs503WithRetryAfterAndReadiness() async throws {
        let sink = FakeSink()
        sink.set(outcome: .unavailable("router down"), ready: false)
        try await withApp(sink) { client, _ in
            let r = try await self.post(client, auth: self.basic("acme-key", "acme-secret"), body: self.batch)
            XCTAssertEqual(r.status, .serviceUnavailable)
            XCTAssertEqual(r.headers[.retryAfter], "1")
            XCTAssertEqual(try self.errorMessage(r).code, "SERVICE_UNAVAILABLE")
            var probe = try await client.execute(uri: "/readyz", method: .get)
            XCTAssertEqual(probe.status, .serviceUnavailable)
            probe = try await client.execute(uri: "/healthz", method: .get)
            XCTAssertEqual(probe.status, .ok)
            sink.set(outcome: .accepted, ready: true)
            probe = try await client.execute(uri: "/readyz", method: .get)
            XCTAssertEqual(probe.status, .ok)
        }
    }

    func testSpoolFullIs429WithRetryAfter() async throws {
        let sink = FakeSink()
        sink.set(outcome: .full(retryAfter: 5))
        try await withApp(sink) { client, _ in
            let r = try await self.post(client, auth: self.basic("acme-key", "acme-secret"), body: self.batch)
            XCTAssertEqual(r.status, .tooManyRequests)
            XCTAssertEqual(r.headers[.retryAfter], "5")
            XCTAssertEqual(try self.errorMessage(r).code, "TOO_MANY_REQUESTS")
        }
    }

    /// Sends `request` as is on a new connection and reads until the server closes it (or 5 s
    /// pass); returns what came back.
    func raw(_ port: Int, _ request: String, thenWait: Bool = true) throws -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        XCTAssertEqual(connected, 0)
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let bytes = Array(request.utf8)
        XCTAssertEqual(send(fd, bytes, bytes.count, 0), bytes.count)
        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { break }
            received += chunk[0..<n]
        }
        return String(decoding: received, as: UTF8.self)
    }

    func request(_ method: String, _ path: String, body: String = "", headers: [String] = []) -> String {
        let auth = basic("acme-key", "acme-secret")
        var lines = ["\(method) \(path) HTTP/1.1", "Host: localhost", "Authorization: \(auth)", "Content-Type: application/json"]
        if !body.isEmpty { lines.append("Content-Length: \(body.utf8.count)") }
        lines += headers
        return lines.joined(separator: "\r\n") + "\r\n\r\n" + body
    }

    func statuses(_ response: String) -> [String] {
        response.components(separatedBy: "HTTP/1.1 ").dropFirst().map { String($0.prefix(3)) }
    }

    func testKeepAliveAndPipelinedRequestsAreAnsweredInOrder() async throws {
        try await withApp { client, sink in
            let pipelined =
                request("POST", "/v2/events", body: self.batch) + request("POST", "/v2/events", body: "{not json")
                + request("GET", "/healthz", headers: ["Connection: close"])
            let response = try self.raw(client.port, pipelined)
            XCTAssertEqual(self.statuses(response), ["202", "400", "200"], response)
            XCTAssertTrue(response.hasSuffix("ok\n"), "the connection closes after the answer that asked for it")
            XCTAssertEqual(sink.submissions.count, 1)
        }
    }

    func testChunkedBodies() async throws {
        try await withApp { client, sink in
            let body = self.batch
            let half = body.utf8.count / 2
            let chunks = String(format: "%x", half) + "\r\n" + String(body.prefix(half)) + "\r\n"
                + String(format: "%x", body.utf8.count - half) + "\r\n" + String(body.dropFirst(half)) + "\r\n0\r\n\r\n"
            let head = self.request("POST", "/v2/events", headers: ["Transfer-Encoding: chunked", "Connection: close"])
            XCTAssertEqual(self.statuses(try self.raw(client.port, head + chunks)), ["202"])
            XCTAssertEqual(String(buffer: sink.submissions[0].batches[0].bytes), body)
            // Chunks past the request limit: 413 as soon as they are, and the connection closes.
            let big = String(repeating: "x", count: 3000)
            let tooMuch = "bb8\r\n\(big)\r\nbb8\r\n\(big)\r\n0\r\n\r\n"
            let response = try self.raw(client.port, head + tooMuch)
            XCTAssertEqual(self.statuses(response), ["413"])
            XCTAssertEqual(sink.submissions.count, 1)
        }
    }

    func testDeclaredOversizedBodyIsRefusedBeforeItIsSent() async throws {
        try await withApp { client, sink in
            // Only the head: the answer comes without waiting for 100 KB that never arrive.
            let head = "POST /v2/events HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n"
            let response = try self.raw(client.port, head)
            XCTAssertEqual(self.statuses(response), ["413"])
            XCTAssertTrue(response.lowercased().contains("connection: close"))
            XCTAssertTrue(response.contains("PAYLOAD_TOO_LARGE"))
            XCTAssertTrue(sink.submissions.isEmpty)
        }
    }

    func testUnknownPathsAndMethods() async throws {
        try await withApp { client, _ in
            var r = try await client.execute(uri: "/v1/events", method: .post, body: ByteBuffer(string: self.batch))
            XCTAssertEqual(r.status, .notFound)
            r = try await client.execute(uri: "/v2/events", method: .get)
            XCTAssertEqual(r.status, .methodNotAllowed)
            XCTAssertEqual(r.headers[.allow], "POST")
            r = try await client.execute(uri: "/healthz", method: .post, body: ByteBuffer(string: "x"))
            XCTAssertEqual(r.status, .methodNotAllowed)
            r = try await client.execute(uri: "/metrics", method: .get)
            XCTAssertEqual(r.status, .ok)
            XCTAssertTrue(String(buffer: r.body).contains("sluice_"), "Prometheus text")
            r = try await client.execute(uri: "/healthz?probe=1", method: .get)
            XCTAssertEqual(r.status, .ok)
            XCTAssertNotNil(r.headers[.date])
            XCTAssertEqual(r.headers[.server], "sluice-ingest")
        }
    }

    func testIdleConnectionsAreClosed() async throws {
        try await withApp(idleTimeout: .milliseconds(200)) { client, _ in
            let started = ContinuousClock.now
            // Says nothing: the server closes the connection; `raw` returns when it does.
            XCTAssertEqual(try self.raw(client.port, ""), "")
            XCTAssertLessThan(ContinuousClock.now - started, .seconds(4), "closed by the idle timeout, not the 5 s read timeout")
        }
    }

    func testBasicCredentialsAreParsedAsSent() throws {
        let auth = Authenticator(tenants: [Tenant(id: "acme", apiKey: "k", apiSecret: Secret("s:with colon"), destinations: [])])
        let token = Data("k:s:with colon".utf8).base64EncodedString()
        for header in ["Basic \(token)", "basic \(token)", "BASIC  \(token) ", "Basic \t\(token)\t"] {
            XCTAssertEqual(try auth.tenant(authorization: header), "acme", header)
        }
        let wrong = Data("k:other".utf8).base64EncodedString()
        let refused: [(String?, APIError)] = [
            (nil, .missingCredentials), ("", .missingCredentials), ("Bearer \(token)", .malformedCredentials),
            ("Basic", .malformedCredentials), ("Basic !!!", .malformedCredentials), ("Basicx \(token)", .malformedCredentials),
            ("Basic \(Data("no-colon".utf8).base64EncodedString())", .malformedCredentials), ("Basic \(wrong)", .invalidCredentials),
        ]
        for (header, expected) in refused {
            XCTAssertThrowsError(try auth.tenant(authorization: header), header ?? "nil") { error in
                XCTAssertEqual((error as? APIError)?.message, expected.message, header ?? "nil")
            }
        }
    }

    func testConstantTimeCompare() {
        XCTAssertTrue(Authenticator.constantTimeEquals(Array("abc".utf8), Array("abc".utf8)))
        XCTAssertFalse(Authenticator.constantTimeEquals(Array("abc".utf8), Array("abd".utf8)))
        XCTAssertFalse(Authenticator.constantTimeEquals(Array("abc".utf8), Array("abcd".utf8)))
        XCTAssertFalse(Authenticator.constantTimeEquals([], Array("a".utf8)))
    }
}
