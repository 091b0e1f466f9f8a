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
    public func start(
        _ name: String, executable: String? = nil, _ arguments: [String] = [], environment: [String: String] = [:]
    ) throws -> Process {
        let process = Process()
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
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

extension ProcessGroup {
    /// GET on another local port (a process's metrics listener).
    public func get(port: Int, _ path: String) throws -> HTTPResult {
        try perform(URLRequest(url: URL(string: "http://127.0.0.1:\(port)\(path)")!))
    }

    /// Sends `signal` to a running process without waiting (e.g. SIGHUP).
    public func signal(_ name: String, _ signal: Int32) {
        if let p = process(name), p.isRunning { kill(p.processIdentifier, signal) }
    }

    /// `ingest status --json` for this group, parsed.
    public func status() throws -> [String: Any] {
        let r = try runCommand(
            BuiltProducts.path("ingest"), ["status", "--json", "--run-dir", runDir, "--config", configPath], timeout: 30)
        guard let object = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any] else {
            throw Failure("status printed no JSON: \(r.out) \(r.err)")
        }
        return object
    }
}

/// Sustained load from users that each send their batches one after another (the next only
/// after the previous got its answer), so each user's accepted batches have a definite order:
/// batch id = user × 1,000,000 + sequence number.
public final class UserLoad: @unchecked Sendable {
    public let lock = NSLock()
    public private(set) var accepted: [Int: [Int]] = [:]  // user → accepted sequence numbers, in order
    public private(set) var refused = 0
    private var stopping = false
    private var threads: [Thread] = []

    public init(group: ProcessGroup, users: Int, threads count: Int = 4, user: String = "acme-key", password: @escaping @Sendable () -> String = { "acme-secret" }) {
        for t in 0..<count {
            let mine = Array(stride(from: t, to: users, by: count))
            let thread = Thread { [unowned self] in
                var seq = [Int: Int]()
                while !self.lock.withLock({ self.stopping }) {
                    for u in mine {
                        let n = (seq[u] ?? 0) + 1
                        let id = (u + 1) * 1_000_000 + n
                        let body = #"{"environment":"production","batch_id":\#(id),"mpid":\#(u + 1),"events":[{"event_type":"custom_event","data":{"event_name":"e","custom_event_type":"other"}}]}"#
                        let status = (try? group.post("/v2/events", body: Data(body.utf8), user: user, password: password()))?.status
                        if status == 202 {
                            seq[u] = n
                            self.lock.withLock { self.accepted[u + 1, default: []].append(n) }
                        } else {
                            // Not accepted (or unknown): the same number is tried again, so order holds.
                            self.lock.withLock { self.refused += 1 }
                            usleep(50_000)
                        }
                    }
                }
            }
            threads.append(thread)
        }
    }

    public func start() { for t in threads { t.start() } }

    public func stop() {
        lock.withLock { stopping = true }
        while threads.contains(where: { !$0.isFinished }) { usleep(20_000) }
    }

    public var acceptedCount: Int { lock.withLock { accepted.values.reduce(0) { $0 + $1.count } } }

    /// Checks topics against what was accepted: every accepted batch present in one of them; per
    /// user and topic, the first copies in offset order are in send order (duplicates after a
    /// crash are allowed). Returns the problems found (empty = good) and the duplicate count.
    public func verify(_ messages: [ConsumedMessage]...) -> (problems: [String], duplicates: Int) {
        var problems: [String] = []
        var duplicates = 0
        var seen: [Int: Set<Int>] = [:]
        for topic in messages {
            var order: [Int: [Int]] = [:]
            for m in topic.sorted(by: { ($0.partition, $0.offset) < ($1.partition, $1.offset) }) {
                guard let obj = try? JSONSerialization.jsonObject(with: Data(m.value.utf8)) as? [String: Any],
                    let id = (obj["batch_id"] as? NSNumber)?.intValue
                else { continue }
                order[id / 1_000_000, default: []].append(id % 1_000_000)
            }
            for (user, got) in order {
                var firsts: [Int] = []
                for n in got {
                    if seen[user, default: []].insert(n).inserted { firsts.append(n) } else { duplicates += 1 }
                }
                if firsts != firsts.sorted() { problems.append("user \(user): out of order \(firsts.prefix(40))") }
            }
        }
        for (user, sent) in lock.withLock({ accepted }) {
            let missing = Set(sent).subtracting(seen[user] ?? [])
            if !missing.isEmpty { problems.append("user \(user): accepted but missing \(missing.sorted().prefix(10))") }
        }
        return (problems, duplicates)
    }
}
