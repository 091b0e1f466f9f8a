import Foundation

/// A message as read back by kcat: an independent consumer, not our producer.
public struct ConsumedMessage: Equatable, Sendable {
    public var partition: Int
    public var offset: Int
    /// nil when the message has no key.
    public var key: String?
    public var value: String
    /// Headers as kcat prints them: `name=value,name=value`.
    public var headers: String = ""

    public func header(_ name: String) -> String? {
        headers.split(separator: ",").first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
    }
}

public enum Kcat {
    public static var path: String? { which("kcat") ?? which("kafkacat") }

    /// Reads a topic from the beginning to its current end.
    public static func consume(bootstrap: String, topic: String) throws -> [ConsumedMessage] {
        guard let kcat = path else { throw KcatMissing() }
        // Fields separated by ASCII unit separators; records by record separators. -K/-D keep the
        // payload intact whatever it contains. A null key prints as empty, so kcat's %K (key length,
        // -1 when null) tells null from "".
        let format = "%p\u{1F}%o\u{1F}%K\u{1F}%k\u{1F}%h\u{1F}%s\u{1E}"
        let result = try runCommand(
            kcat, ["-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-f", format], timeout: 60)
        guard result.status == 0 else { throw KcatFailed(message: result.err) }
        return result.out.split(separator: "\u{1E}", omittingEmptySubsequences: true).compactMap { record in
            let f = record.split(separator: "\u{1F}", maxSplits: 5, omittingEmptySubsequences: false).map(String.init)
            guard f.count == 6, let p = Int(f[0]), let o = Int(f[1]) else { return nil }
            return ConsumedMessage(partition: p, offset: o, key: f[2] == "-1" ? nil : f[3], value: f[5], headers: f[4])
        }
    }

    public struct KcatMissing: Error {}
    public struct KcatFailed: Error { public var message: String }
}
