import Foundation

#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The real built executables, started in a private temporary run directory: the dev cluster,
/// router, outputs and ingest, each logging to its own file there.
public final class ProcessGroup: @unchecked Sendable {
    public let runDir: String
    public let configPath: String
    public private(set) var port: Int = 0
    private var processes: [String: Process] = [:]
    private let lock = NSLock()

    public init(config: String) throws {
        runDir = try makeRunDirectory()
        configPath = runDir + "/sluice.yaml"
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    deinit {
        stopAll(signal: SIGKILL)
        // SLUICE_KEEP_RUN_DIR=1 keeps logs, spool and sockets for a look after a failure.
        if ProcessInfo.processInfo.environment["SLUICE_KEEP_RUN_DIR"] == nil {
            try? FileManager.default.removeItem(atPath: runDir)
        }
    }

    /// Replaces the config file (for configs that need addresses known only after start).
    public func writeConfig(_ config: String) throws {
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    public var bootstrapFile: String { runDir + "/dev-cluster.bootstrap" }

    public var bootstrapServers: String {
        (try? String(contentsOfFile: bootstrapFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
    }

    /// Starts `executable` with the common options and `arguments`; its output goes to `<name>.log`.
    @discardableResult
    public func start(_ name: String, executable: String? = nil, _ arguments: [String] = []) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: BuiltProducts.path(executable ?? name))
        process.arguments = arguments + ["--run-dir", runDir, "--config", configPath, "--log-level", "debug"]
        let log = runDir + "/\(name).log"
        FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        handle.seekToEndOfFile()
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        lock.withLock { processes[name] = process }
        return process
    }

    public func startDevCluster(brokers: Int = 3, topics: [String] = []) throws {
        try start("dev-cluster", executable: "kafka-out", ["dev-cluster", "--brokers", String(brokers)] + topics.flatMap { ["--topic", $0] })
        guard eventually(timeout: 30, { !bootstrapServers.isEmpty }) else { throw Failure("dev cluster did not start\n\(logs())") }
    }

    public func startIngest() throws {
        if port == 0 { port = try freePort() }
        try start("ingest", ["--listen", "127.0.0.1:\(port)"])
        guard eventually(timeout: 30, { (try? get("/healthz").status) == 200 }) else { throw Failure("ingest did not start\n\(logs())") }
    }

    /// Starts dev cluster, router, one kafka-out and ingest, and waits until ingest is ready.
    public func startAll(topics: [String] = []) throws {
        try startDevCluster(topics: topics)
        try start("router")
        try start("kafka-out")
        try startIngest()
        guard eventually(timeout: 30, { (try? get("/readyz").status) == 200 }) else { throw Failure("ingest not ready\n\(logs())") }
    }

    public func process(_ name: String) -> Process? { lock.withLock { processes[name] } }

    /// Sends `signal` to one process and waits for it to exit; returns its exit status.
    @discardableResult
    public func stop(_ name: String, signal: Int32 = SIGTERM, timeout: TimeInterval = 30) -> Int32? {
        guard let p = lock.withLock({ processes.removeValue(forKey: name) }) else { return nil }
        guard p.isRunning else { return p.terminationStatus }
        kill(p.processIdentifier, signal)
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        return p.terminationStatus
    }

    public func stopAll(signal: Int32 = SIGTERM) {
        for name in ["ingest", "kafka-out", "keen-out", "router", "dev-cluster"] { stop(name, signal: signal) }
        for name in lock.withLock({ Array(processes.keys) }) { stop(name, signal: signal) }
    }

    public func logs() -> String {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? []
        return files.filter { $0.hasSuffix(".log") }.sorted().map { name in
            "--- \(name)\n" + ((try? String(contentsOfFile: runDir + "/" + name, encoding: .utf8)) ?? "")
        }.joined(separator: "\n")
    }

    // MARK: HTTP

    public struct HTTPResult: Sendable {
        public var status: Int
        public var headers: [String: String]
        public var body: String
    }

    public func post(
        _ path: String, body: Data, user: String?, password: String?, headers: [String: String] = [:]
    ) throws -> HTTPResult {
        var request = URLRequest(url: URL(string: "http://127.0.0.1:\(port)\(path)")!)
        request.httpMethod = "POST"
        request.httpBody = body
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        if let user, let password {
            request.setValue("Basic " + Data("\(user):\(password)".utf8).base64EncodedString(), forHTTPHeaderField: "Authorization")
        }
        for (k, v) in headers { request.setValue(v, forHTTPHeaderField: k) }
        return try perform(request)
    }

    public func get(_ path: String) throws -> HTTPResult {
        try perform(URLRequest(url: URL(string: "http://127.0.0.1:\(port)\(path)")!))
    }

    private func perform(_ request: URLRequest) throws -> HTTPResult {
        var request = request
        request.timeoutInterval = 30
        let box = ResultBox()
        let semaphore = DispatchSemaphore(value: 0)
        URLSession.shared.dataTask(with: request) { data, response, error in
            if let error {
                box.result = .failure(error)
            } else if let http = response as? HTTPURLResponse {
                var headers: [String: String] = [:]
                for (k, v) in http.allHeaderFields { headers["\(k)".lowercased()] = "\(v)" }
                box.result = .success(HTTPResult(status: http.statusCode, headers: headers, body: String(decoding: data ?? Data(), as: UTF8.self)))
            }
            semaphore.signal()
        }.resume()
        semaphore.wait()
        return try box.result!.get()
    }

    final class ResultBox: @unchecked Sendable { var result: Result<HTTPResult, Error>? }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
        public init(_ d: String) { description = d }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
public func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let rc = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p -> Int32 in
            guard bind(fd, p, len) == 0 else { return -1 }
            return getsockname(fd, p, &len)
        }
    }
    guard rc == 0 else { throw POSIXError(.EADDRINUSE) }
    return Int(UInt16(bigEndian: addr.sin_port))
}

extension ProcessGroup {
    /// A config with one tenant, `acme` (key `acme-key`, secret `acme-secret`), whose one Kafka
    /// destination `main` writes to `topic` on the dev cluster. `ingest` is an optional flow
    /// mapping of ingest settings, e.g. `{spool_max_bytes: 65536}`.
    public static func acmeConfig(topic: String, ingest: String? = nil) -> String {
        (ingest.map { "ingest: \($0)\n" } ?? "") + """
            tenants:
              acme:
                api_key: acme-key
                api_secret: acme-secret
                destinations:
                  main: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: \(topic)}
            """
    }
}
