import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The corpus of malformed and hostile inputs (Tests/corpus), replayed against the real processes
/// on every run: each gets a 4xx or a closed connection, no process crashes, and good traffic
/// still flows.
final class BadInputTests: XCTestCase {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("corpus")

    func files(_ folder: String) throws -> [URL] {
        try FileManager.default.contentsOfDirectory(
            at: Self.corpus.appendingPathComponent(folder), includingPropertiesForKeys: nil
        ).filter { $0.pathExtension == "bin" }.sorted { $0.path < $1.path }
    }

    func testCorpusIsRefusedAndNothingBreaks() throws {
        let group = try ProcessGroup(config: ProcessGroup.acmeConfig(topic: "bad-input"))
        try group.startAll(topics: ["bad-input:1"])

        // Slow clients that never finish their request hold no one else up.
        var slow: [Int32] = []
        for _ in 0..<20 {
            let fd = try connectTCP(port: group.port)
            let partial = "POST /v2/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"env"
            _ = partial.withCString { write(fd, $0, strlen($0)) }
            slow.append(fd)
        }
        defer { slow.forEach { close($0) } }

        let bodies = try files("bodies")
        XCTAssertGreaterThan(bodies.count, 30)
        for file in bodies {
            let name = file.deletingPathExtension().lastPathComponent
            let path = name.hasPrefix("bulk-") ? "/v2/bulkevents" : "/v2/events"
            let headers = name.hasPrefix("gzip-") ? ["Content-Encoding": "gzip"] : [:]
            let r = try group.post(path, body: try Data(contentsOf: file), user: "acme-key", password: "acme-secret", headers: headers)
            XCTAssertTrue((400..<500).contains(r.status), "\(name): \(r.status) \(r.body.prefix(200))")
            XCTAssertTrue(r.body.contains("\"errors\""), "\(name): errors are JSON")
        }

        for file in try files("frames") {
            let fd = try connectUnix(group.runDir + "/router.sock")
            let bytes = try Data(contentsOf: file)
            bytes.withUnsafeBytes { _ = write(fd, $0.baseAddress, $0.count) }
            var tv = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var buffer = [UInt8](repeating: 0, count: 65536)
            var received = Data()
            while true {
                let n = read(fd, &buffer, buffer.count)
                if n <= 0 { break }
                received.append(contentsOf: buffer[0..<n])
            }
            close(fd)
            let name = file.lastPathComponent
            if name != "length-only.bin" {  // an unfinished frame just waits for its bytes
                XCTAssertTrue(String(decoding: received, as: UTF8.self).contains("\"type\":\"error\""), "\(name): answered with an error frame")
            }
        }

        for name in ["ingest", "router", "kafka-out", "dev-cluster"] {
            XCTAssertTrue(group.process(name)?.isRunning == true, "\(name) survived\n\(group.logs())")
        }
        let good = #"{"environment":"production","mpid":11,"events":[]}"#
        XCTAssertEqual(try group.post("/v2/events", body: Data(good.utf8), user: "acme-key", password: "acme-secret").status, 202)
        var messages: [ConsumedMessage] = []
        _ = try eventually(timeout: 60) {
            messages = try Kcat.consume(bootstrap: group.bootstrapServers, topic: "bad-input")
            return !messages.isEmpty
        }
        XCTAssertEqual(messages.map(\.value), [good], "only the good batch went through")
    }
}

func connectTCP(port: Int) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = UInt16(port).bigEndian
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard rc == 0 else { close(fd); throw POSIXError(.ECONNREFUSED) }
    return fd
}
