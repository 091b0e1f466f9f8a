import Foundation

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Keen's HTTP API, emulated (`Tests/tools/keen_emulator.py`): checks keys, body shape and Keen's
/// naming and size rules the way the service does, and can be told to fail events or requests.
public final class KeenEmulator: @unchecked Sendable {
    public let process: Process
    public let baseURL: String
    public static let project = "proj1"
    public static let writeKey = "keen-write-key-5e1f"
    public static let readKey = "keen-read-key-77aa"

    /// `tls`: (certificate, key) PEM files to serve HTTPS with.
    public init(workDir: String, tls: (certificate: String, key: String)? = nil) throws {
        let portFile = workDir + "/keen.port"
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [
            "python3", TestTools.directory.appendingPathComponent("keen_emulator.py").path, "--port", "0", "--project",
            Self.project, "--write-key", Self.writeKey, "--read-key", Self.readKey, "--master-key", "keen-master-key",
            "--port-file", portFile, "--log", workDir + "/keen-emulator.log",
        ]
        if let tls { process.arguments! += ["--tls-cert", tls.certificate, "--tls-key", tls.key] }
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        var address = ""
        _ = eventually(timeout: 30) {
            address = ((try? String(contentsOfFile: portFile, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            return !address.isEmpty
        }
        guard !address.isEmpty else { throw ProcessGroup.Failure("the Keen emulator did not start") }
        baseURL = (tls == nil ? "http://" : "https://") + address.replacingOccurrences(of: "127.0.0.1", with: tls == nil ? "127.0.0.1" : "localhost")
    }

    deinit {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
    }

    /// `POST /_control` with a JSON object (see the emulator's docstring).
    public func control(_ json: String) throws {
        _ = try request("POST", "/_control", body: json)
    }

    /// The events stored in one collection.
    public func events(_ collection: String) throws -> [[String: Any]] {
        let text = try request("GET", "/_events?collection=\(collection)", body: nil)
        let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]
        return object?["events"] as? [[String: Any]] ?? []
    }

    private func request(_ method: String, _ path: String, body: String?) throws -> String {
        precondition(baseURL.hasPrefix("http://"), "control requests need the plain-HTTP emulator")
        var request = URLRequest(url: URL(string: baseURL + path)!)
        request.httpMethod = method
        request.httpBody = body.map { Data($0.utf8) }
        request.timeoutInterval = 30
        final class Box: @unchecked Sendable { var result: Result<String, Error> = .success("") }
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        URLSession.shared.dataTask(with: request) { data, _, error in
            box.result = error.map { .failure($0) } ?? .success(String(decoding: data ?? Data(), as: UTF8.self))
            done.signal()
        }.resume()
        done.wait()
        return try box.result.get()
    }
}
