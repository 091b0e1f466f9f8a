import Foundation
import Logging

/// Log output format: human-readable text or one JSON object per line.
public enum LogFormat: String, Sendable, CaseIterable {
    case text, json
}

/// Writes log records to standard error as text or JSON lines. Messages are constants; data goes
/// in metadata with dotted keys. Secrets are never passed to a logger (`Secret` prints redacted).
public struct SluiceLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    let label: String
    let format: LogFormat

    public init(label: String, level: Logger.Level, format: LogFormat) {
        self.label = label
        self.logLevel = level
        self.format = format
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { _, new in new } }
        if let extra = event.metadata { all.merge(extra) { _, new in new } }
        let time = Date().formatted(.iso8601.year().month().day().time(includingFractionalSeconds: true)) + "Z"
        var line: String
        switch format {
        case .text:
            line = "\(time) \(event.level.rawValue.uppercased()) \(label): \(event.message)"
            for key in all.keys.sorted() { line += " \(key)=\(all[key]!)" }
        case .json:
            var obj: [JSONValue.Member] = [
                .init("time", .string(time)), .init("level", .string(event.level.rawValue)),
                .init("process", .string(label)), .init("message", .string("\(event.message)")),
            ]
            for key in all.keys.sorted() { obj.append(.init(key, Self.json(all[key]!))) }
            line = JSONValue.object(obj).jsonString
        }
        line += "\n"
        FileHandle.standardError.write(Data(line.utf8))
    }

    static func json(_ value: Logger.Metadata.Value) -> JSONValue {
        switch value {
        case .string(let s): return .string(s)
        case .stringConvertible(let c): return .string(c.description)
        case .array(let a): return .array(a.map(json))
        case .dictionary(let d): return .object(d.keys.sorted().map { .init($0, json(d[$0]!)) })
        }
    }
}

public enum SluiceLogging {
    /// Sets up process-wide logging once, at start.
    public static func bootstrap(process: String, level: Logger.Level, format: LogFormat) {
        LoggingSystem.bootstrap { label in SluiceLogHandler(label: label, level: level, format: format) }
    }
}
