import CCurl
import Foundation

/// A blocking HTTP client on libcurl for Keen's API: one easy handle per client (connections are
/// reused across requests), TLS verification on, timeouts on every request. Not thread-safe: one
/// client per thread.
final class CurlClient {
    struct Response {
        var status: Int
        var body: Data
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    private let handle: UnsafeMutableRawPointer
    private let caPEM: String?
    let timeout: Duration

    init(caPEM: String?, timeout: Duration = .seconds(30)) {
        _ = Self.globalInit
        handle = curl_easy_init()
        self.caPEM = caPEM
        self.timeout = timeout
    }

    deinit { curl_easy_cleanup(handle) }

    private static let globalInit: Void = { curl_global_init(Int(CURL_GLOBAL_ALL)) }()

    /// POSTs `body` (JSON) to `url` with `Authorization: <key>`.
    func post(_ url: String, authorization: String, body: Data) throws(Failure) -> Response {
        curl_easy_reset(handle)
        let box = ResponseBox()
        var headers: UnsafeMutablePointer<curl_slist>?
        headers = curl_slist_append(headers, "Content-Type: application/json")
        headers = curl_slist_append(headers, "Authorization: \(authorization)")
        headers = curl_slist_append(headers, "Expect:")  // no 100-continue round trip
        defer { curl_slist_free_all(headers) }
        let code: CURLcode = body.withUnsafeBytes { raw in
            sluice_curl_setopt_string(handle, CURLOPT_URL, url)
            sluice_curl_setopt_pointer(handle, CURLOPT_HTTPHEADER, headers)
            sluice_curl_setopt_long(handle, CURLOPT_POST, 1)
            sluice_curl_setopt_pointer(handle, CURLOPT_POSTFIELDS, UnsafeMutableRawPointer(mutating: raw.baseAddress))
            sluice_curl_setopt_long(handle, CURLOPT_POSTFIELDSIZE, raw.count)
            sluice_curl_setopt_long(handle, CURLOPT_TIMEOUT_MS, Self.milliseconds(timeout))
            sluice_curl_setopt_long(handle, CURLOPT_CONNECTTIMEOUT_MS, 10_000)
            sluice_curl_setopt_long(handle, CURLOPT_NOSIGNAL, 1)
            sluice_curl_setopt_long(handle, CURLOPT_SSL_VERIFYPEER, 1)
            sluice_curl_setopt_long(handle, CURLOPT_SSL_VERIFYHOST, 2)
            if let caPEM {
                var pem = Array(caPEM.utf8)
                pem.withUnsafeMutableBytes { p in
                    _ = sluice_curl_setopt_blob(handle, CURLOPT_CAINFO_BLOB, p.baseAddress, p.count)
                }
            }
            sluice_curl_setopt_write_function(handle) { ptr, size, count, user in
                let n = size * count
                guard let ptr, let user else { return n }
                Unmanaged<ResponseBox>.fromOpaque(user).takeUnretainedValue().data.append(
                    UnsafeRawPointer(ptr).assumingMemoryBound(to: UInt8.self), count: n)
                return n
            }
            sluice_curl_setopt_pointer(handle, CURLOPT_WRITEDATA, Unmanaged.passUnretained(box).toOpaque())
            return curl_easy_perform(handle)
        }
        guard code == CURLE_OK else {
            throw Failure(description: "\(url): \(String(cString: curl_easy_strerror(code)))")
        }
        var status = 0
        sluice_curl_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &status)
        return withExtendedLifetime(box) { Response(status: status, body: box.data) }
    }

    private final class ResponseBox {
        var data = Data()
    }

    static func milliseconds(_ d: Duration) -> Int {
        Int(d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000)
    }
}
