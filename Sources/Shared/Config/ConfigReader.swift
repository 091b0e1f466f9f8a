import Foundation
import Yams

/// A configuration problem, located precisely: file, line, tenant, destination and field.
public struct ConfigError: Error, CustomStringConvertible, Equatable, Sendable {
    public var file: String
    public var line: Int?
    public var tenant: String?
    public var destination: String?
    public var field: String?
    public var problem: String

    public var description: String {
        var where_: [String] = []
        if let tenant { where_.append("tenant '\(tenant)'") }
        if let destination { where_.append("destination '\(destination)'") }
        if let field { where_.append("field '\(field)'") }
        let location = line.map { "\(file):\($0)" } ?? file
        return where_.isEmpty ? "\(location): \(problem)" : "\(location): \(where_.joined(separator: ", ")): \(problem)"
    }
}

/// Walks a YAML mapping, remembering where it is so every error names its place, and rejecting
/// keys nobody asked for (a misspelt setting is an error, never silently ignored).
struct ConfigNode {
    let node: Node
    let file: String
    var tenant: String?
    var destination: String?
    var path: String
    let environment: [String: String]

    func fail(_ problem: String, field: String? = nil, at node: Node? = nil) -> ConfigError {
        ConfigError(
            file: file, line: (node ?? self.node).mark?.line, tenant: tenant, destination: destination,
            field: field ?? (path.isEmpty ? nil : path), problem: problem)
    }

    func fieldName(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func mapping() throws(ConfigError) -> Node.Mapping {
        guard let m = node.mapping else { throw fail("must be a mapping") }
        return m
    }

    /// Checks that only `allowed` keys are present.
    func checkKeys(_ allowed: Set<String>) throws(ConfigError) {
        for (key, _) in try mapping() {
            guard let name = key.string else { throw fail("keys must be strings", at: key) }
            if !allowed.contains(name) {
                let known = allowed.sorted().joined(separator: ", ")
                throw fail("unknown setting '\(name)' (known: \(known))", field: fieldName(name), at: key)
            }
        }
    }

    func child(_ key: String) throws(ConfigError) -> ConfigNode? {
        guard let value = try mapping()[key] else { return nil }
        if case .scalar(let s) = value, s.string.isEmpty || s.string == "~" || s.string == "null", s.style == .plain {
            return nil
        }
        var c = self
        c = ConfigNode(node: value, file: file, tenant: tenant, destination: destination, path: fieldName(key), environment: environment)
        return c
    }

    func string(_ key: String) throws(ConfigError) -> String? {
        guard let c = try child(key) else { return nil }
        guard case .scalar(let s) = c.node else { throw c.fail("must be a string") }
        return s.string
    }

    func requiredString(_ key: String) throws(ConfigError) -> String {
        guard let s = try string(key), !s.isEmpty else { throw fail("is required", field: fieldName(key)) }
        return s
    }

    func bool(_ key: String) throws(ConfigError) -> Bool? {
        guard let c = try child(key) else { return nil }
        guard let b = c.node.bool else { throw c.fail("must be true or false") }
        return b
    }

    func int(_ key: String, range: ClosedRange<Int>) throws(ConfigError) -> Int? {
        guard let c = try child(key) else { return nil }
        guard let v = c.node.int else { throw c.fail("must be a whole number") }
        guard range.contains(v) else { throw c.fail("must be between \(range.lowerBound) and \(range.upperBound)") }
        return v
    }

    /// A secret: a plain string, `{env: NAME}` or `{file: PATH}`.
    func secret(_ key: String) throws(ConfigError) -> Secret? {
        guard let c = try child(key) else { return nil }
        switch c.node {
        case .scalar(let s):
            guard !s.string.isEmpty else { throw c.fail("must not be empty") }
            return Secret(s.string)
        case .mapping:
            try c.checkKeys(["env", "file"])
            let env = try c.string("env")
            let file = try c.string("file")
            switch (env, file) {
            case (let name?, nil):
                guard let value = environment[name], !value.isEmpty else {
                    throw c.fail("environment variable '\(name)' is not set or empty")
                }
                return Secret(value)
            case (nil, let path?):
                guard let data = FileManager.default.contents(atPath: path) else {
                    throw c.fail("cannot read secret file '\(path)'")
                }
                var value = String(decoding: data, as: UTF8.self)
                // A trailing newline from `echo secret > file` is not part of the secret.
                while value.hasSuffix("\n") || value.hasSuffix("\r") { value.removeLast() }
                guard !value.isEmpty else { throw c.fail("secret file '\(path)' is empty") }
                return Secret(value)
            default:
                throw c.fail("give exactly one of 'env' or 'file'")
            }
        default:
            throw c.fail("must be a string, {env: NAME} or {file: PATH}")
        }
    }

    /// The entries of a mapping keyed by name, in file order.
    func entries() throws(ConfigError) -> [(name: String, node: ConfigNode)] {
        var out: [(name: String, node: ConfigNode)] = []
        for (key, value) in try mapping() {
            guard let name = key.string else { throw fail("keys must be strings", at: key) }
            out.append((name, ConfigNode(node: value, file: file, tenant: tenant, destination: destination, path: fieldName(name), environment: environment)))
        }
        return out
    }
}

/// A secret value. Its description never shows the value, so it cannot leak into logs by accident.
public struct Secret: Sendable, Equatable, CustomStringConvertible, CustomDebugStringConvertible {
    public let value: String
    public init(_ value: String) { self.value = value }
    public var description: String { "<redacted>" }
    public var debugDescription: String { "<redacted>" }
}
