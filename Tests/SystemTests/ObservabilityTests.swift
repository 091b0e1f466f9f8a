import Foundation
import TestSupport
import XCTest

/// Metrics on every process parse as Prometheus text and move with the traffic; readiness needs
/// the outputs; `ingest status` shows each tenant's destination.
final class ObservabilityTests: XCTestCase {
    /// Every line of a Prometheus text exposition: a comment or `name{labels} value`.
    func assertPrometheusText(_ text: String, file: StaticString = #filePath, line: UInt = #line) {
        let sample = try! NSRegularExpression(
            pattern: #"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$"#)
        for l in text.split(separator: "\n") {
            let s = String(l)
            if s.hasPrefix("# HELP ") || s.hasPrefix("# TYPE ") { continue }
            let ok = sample.firstMatch(in: s, range: NSRange(s.startIndex..., in: s)) != nil
            XCTAssertTrue(ok, "not Prometheus text: \(s)", file: file, line: line)
        }
    }

    func value(_ text: String, _ series: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }

    func testMetricsReadinessAndStatus() throws {
        let group = try ProcessGroup(config: ProcessGroup.acmeConfig(topic: "observed"))
        try group.startDevCluster(topics: ["observed:2"])
        let routerPort = try freePort()
        let outPort = try freePort()
        try group.start("router", ["--metrics-listen", "127.0.0.1:\(routerPort)"])
        try group.startIngest()
        XCTAssertTrue(eventually { (try? group.get("/healthz").status) == 200 })
        XCTAssertEqual(try group.get("/readyz").status, 503, "no kafka-out yet: not ready")
        try group.start("kafka-out", ["--metrics-listen", "127.0.0.1:\(outPort)"])
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 }, group.logs())

        for i in 1...10 {
            let body = #"{"environment":"production","batch_id":\#(i),"mpid":\#(i),"events":[{"event_type":"custom_event","data":{"event_name":"e","custom_event_type":"other"}},{"event_type":"custom_event","data":{"event_name":"f","custom_event_type":"other"}}]}"#
            XCTAssertEqual(try group.post("/v2/events", body: Data(body.utf8), user: "acme-key", password: "acme-secret").status, 202)
        }
        XCTAssertEqual(try group.post("/v2/events", body: Data("{".utf8), user: "acme-key", password: "acme-secret").status, 400)
        XCTAssertEqual(try group.post("/v2/events", body: Data("{}".utf8), user: "acme-key", password: "nope").status, 403)

        var router = ""
        XCTAssertTrue(
            eventually(timeout: 30) {
                router = (try? group.get(port: routerPort, "/metrics").body) ?? ""
                return value(router, #"sluice_router_messages_total{kind="kafka",outcome="delivered"}"#) == 10
            }, router)
        let ingest = try group.get("/metrics").body
        let out = try group.get(port: outPort, "/metrics").body
        for text in [ingest, router, out] { assertPrometheusText(text) }
        XCTAssertEqual(value(ingest, "sluice_ingest_batches_accepted_total"), 10)
        XCTAssertEqual(value(ingest, "sluice_ingest_events_accepted_total"), 20)
        XCTAssertEqual(value(ingest, #"sluice_ingest_requests_rejected_total{reason="bad_request"}"#), 1)
        XCTAssertEqual(value(ingest, #"sluice_ingest_requests_rejected_total{reason="forbidden"}"#), 1)
        XCTAssertEqual(value(ingest, #"sluice_ingest_request_duration_seconds_count{endpoint="events"}"#), 12)
        XCTAssertEqual(value(ingest, "sluice_ingest_ready"), 1)
        XCTAssertEqual(value(router, #"sluice_router_outputs{kind="kafka"}"#), 1)
        XCTAssertEqual(value(router, #"sluice_router_delivery_duration_seconds_count{kind="kafka"}"#), 10)
        XCTAssertEqual(value(out, #"sluice_kafka_out_messages_total{outcome="delivered"}"#), 10)
        XCTAssertEqual(value(out, "sluice_kafka_out_producers"), 1)
        XCTAssertFalse((ingest + router + out).contains("acme"), "tenant ids are never labels")
        // librdkafka's statistics arrive every 5 s.
        XCTAssertTrue(
            eventually(timeout: 20) {
                let text = (try? group.get(port: outPort, "/metrics").body) ?? ""
                return (value(text, "sluice_kafka_out_broker_rtt_average_seconds") ?? 0) > 0
            })

        let status = try group.status()
        let destinations = status["destinations"] as? [[String: Any]] ?? []
        XCTAssertEqual(destinations.count, 1, "\(status)")
        XCTAssertEqual(destinations.first?["tenant"] as? String, "acme")
        XCTAssertEqual(destinations.first?["destination"] as? String, "main")
        XCTAssertEqual(destinations.first?["delivered"] as? Int, 10)
        XCTAssertEqual(destinations.first?["waiting_in_spool"] as? Int, 0)
        XCTAssertEqual(status["outputs_ready"] as? Bool, true)
        let text = try runCommand(BuiltProducts.path("ingest"), ["status", "--run-dir", group.runDir], timeout: 30).out
        XCTAssertTrue(text.contains("kafka-out"), text)
        XCTAssertTrue(text.split(separator: "\n").contains { $0.hasPrefix("acme") && $0.contains(" 10 ") }, text)
    }
}
