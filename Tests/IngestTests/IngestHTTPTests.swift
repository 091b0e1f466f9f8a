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
    func submit(tenant: String, batches: [ValidatedBatch]) async -> SubmitOutcome {
        box.withLockedValue { s in
            s.submissions.append((tenant, batches))
            return s.outcome
        }
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

    func withApp(_ sink: FakeSink = FakeSink(), _ body: @Sendable (any TestClientProtocol, FakeSink) async throws -> Void) async throws {
        let config = try SluiceConfig.parse(yaml: yaml)
        let app = buildApplication(config: config, sink: sink, logger: Logger(label: "test"))
        try await app.test(.router) { client in try await body(client, sink) }
    }

    func post(
        _ client: any TestClientProtocol, _ path: String = "/v2/events", auth: String? = nil, body: String,
        headers extra: HTTPFields = [:]
    ) async throws -> TestResponse {
        var headers: HTTPFields = [.contentType: "application/json"]
        for field in extra { headers[field.name] = field.value }
        if let auth { headers[.authorization] = auth }
        return try await client.execute(uri: path, method: .post, headers: headers, body: ByteBuffer(string: body))
    }

    func errorMessage(_ response: TestResponse) throws -> (code: String, message: String) {
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
