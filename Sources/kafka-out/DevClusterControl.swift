import Foundation
import KafkaClient
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// Fault injection for the dev cluster, for outage tests: a Unix socket (0600, in the run
/// directory) that takes one command per line and answers `ok` or `error: …`:
///
///     down                      every broker down (connections closed, new ones refused)
///     up                        every broker up again
///     rtt MILLISECONDS          delay every broker's answers
///     errors API_KEY CODE...    the next requests of that API fail with these Kafka error codes
///                               (e.g. `errors 0 19 19 7`: Produce fails twice with
///                               NOT_ENOUGH_REPLICAS, then once with REQUEST_TIMED_OUT)
final class DevClusterControl: @unchecked Sendable {
    let path: String
    private let cluster: MockCluster
    private let logger: Logger
    private var fd: Int32 = -1

    init(path: String, cluster: MockCluster, logger: Logger) {
        self.path = path
        self.cluster = cluster
        self.logger = logger
    }

    func start() throws {
        unlink(path)
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.prefix(raw.count - 1).enumerated() { raw[i] = b } }
        let oldMask = umask(0o177)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(oldMask)
        guard rc == 0, listen(fd, 8) == 0 else { throw POSIXError(.EADDRINUSE) }
        let thread = Thread { [self] in self.serve() }
        thread.name = "dev-cluster-control"
        thread.start()
    }

    func stop() {
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
        unlink(path)
    }

    private func serve() {
        while true {
            let client = accept(fd, nil, nil)
            if client < 0 { return }
            var data = [UInt8]()
            var buffer = [UInt8](repeating: 0, count: 1024)
            while !data.contains(0x0A) {
                let n = read(client, &buffer, buffer.count)
                if n <= 0 { break }
                data.append(contentsOf: buffer[0..<n])
            }
            let line = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            let answer = execute(line) + "\n"
            _ = answer.withCString { write(client, $0, strlen($0)) }
            close(client)
        }
    }

    func execute(_ line: String) -> String {
        let words = line.split(separator: " ").map(String.init)
        logger.warning("dev cluster fault injection", metadata: ["command": "\(line)"])
        switch words.first {
        case "down":
            cluster.setBroker(-1, up: false)
        case "up":
            cluster.setBroker(-1, up: true)
        case "rtt":
            guard words.count == 2, let ms = Int(words[1]) else { return "error: rtt MILLISECONDS" }
            cluster.setRoundTripTime(ms)
        case "errors":
            guard words.count >= 3, let api = Int16(words[1]) else { return "error: errors API_KEY CODE..." }
            let codes = words.dropFirst(2).compactMap { Int32($0) }
            guard codes.count == words.count - 2 else { return "error: codes are numbers" }
            cluster.pushRequestErrors(apiKey: api, errors: codes)
        default:
            return "error: unknown command (down, up, rtt MS, errors API_KEY CODE...)"
        }
        return "ok"
    }
}
