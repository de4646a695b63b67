//! The HTTP/1.1 side of the port: the WebSocket upgrade (RFC 6455 section 4.2) and plain GETs.
//!
//! Pure functions over bytes: the loop hands in what it has read, gets back what to answer.
//! Every refusal is a clear HTTP status with a one-line body saying what was wrong, so a
//! misconfigured client or proxy shows up in its logs instead of as a silent hang.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::client_addr::Forwarded;
use super::deflate;

/// Requests longer than this (line plus headers) are refused with 431: bounded memory whatever
/// a client sends.
pub const MAX_REQUEST: usize = 8192;
const MAX_HEADERS: usize = 32;
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Incomplete,
    /// A valid upgrade of `path` (query included): answer with `response`; frames start at
    /// `consumed`. `forwarded`: the request's X-Forwarded-For / X-Real-IP, believed or not by
    /// the caller (`client_addr::resolve`), which knows the peer.
    Upgrade {
        response: Vec<u8>,
        consumed: usize,
        path: String,
        forwarded: Forwarded,
        /// The token the client presented (`auth.rs` decides what it is worth).
        credentials: Credentials,
        /// permessage-deflate agreed: `Some(true)` if the server may compress too.
        deflate: Option<bool>,
    },
    /// A plain GET of `path` (no upgrade asked); the loop answers /healthz and /metrics.
    Get { path: String },
    /// Refused: send this response and close.
    Reject { response: Vec<u8>, status: u16 },
}

/// The token an upgrade carries: `?token=` in the URL (browsers cannot set headers on a
/// WebSocket) or `Authorization: Bearer` (every other client).
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    None,
    Token(String),
    /// Two tokens that disagree (query and header, two `token=`, two Authorization headers):
    /// which one the client meant cannot be told, so neither counts.
    Conflict,
}

impl Credentials {
    fn add(self, token: &str) -> Credentials {
        match self {
            Credentials::None => Credentials::Token(token.to_string()),
            Credentials::Token(t) if t == token => Credentials::Token(t),
            _ => Credentials::Conflict,
        }
    }
}

/// The request's token, from the query and from `Authorization: Bearer` headers (other
/// schemes are not ours, and ignored). Two Bearer headers are a conflict even when they agree:
/// a proxy that adds one to a client's must not pass unnoticed.
fn credentials(path: &str, headers: &[httparse::Header<'_>]) -> Credentials {
    let mut found = Credentials::None;
    if let Some((_, query)) = path.split_once('?') {
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            if k == "token" {
                found = found.add(v);
            }
        }
    }
    let mut bearers = 0;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("authorization"))
    {
        let value = String::from_utf8_lossy(h.value);
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            continue;
        };
        if scheme.eq_ignore_ascii_case("bearer") {
            bearers += 1;
            found = found.add(token.trim());
        }
    }
    if bearers > 1 {
        return Credentials::Conflict;
    }
    found
}

/// What the server accepts.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// When not empty, the Origin header must be one of these (browsers send it; a page on
    /// another site must not be able to open connections as the user).
    pub allowed_origins: Vec<String>,
    /// Whether permessage-deflate is offered back (`--deflate on`).
    pub deflate: bool,
}

pub fn parse(buf: &[u8], policy: &Policy) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST => {
            return reject(431, "request header fields too large", "");
        }
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(httparse::Error::TooManyHeaders) => {
            return reject(431, "too many header fields", "");
        }
        Err(e) => return reject(400, &format!("malformed HTTP request: {e}"), ""),
    };
    if consumed > MAX_REQUEST {
        return reject(431, "request header fields too large", "");
    }
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("/").to_string();
    if method != "GET" {
        return reject(405, "only GET is served here", "Allow: GET\r\n");
    }
    let one = |name: &str| -> Result<Option<&[u8]>, ()> {
        let mut found = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name));
        let first = found.next().map(|h| h.value);
        if found.next().is_some() {
            return Err(());
        }
        Ok(first)
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .any(|v| v.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    };
    let upgrade_asked = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    if !upgrade_asked {
        return Parsed::Get { path };
    }
    if !has_token("upgrade", "websocket") {
        return reject(400, "only Upgrade: websocket is supported", "");
    }
    if req.version != Some(1) {
        return reject(400, "WebSocket upgrades need HTTP/1.1", "");
    }
    if !has_token("connection", "upgrade") {
        return reject(400, "Connection header must include Upgrade", "");
    }
    match one("host") {
        Ok(Some(_)) => {}
        _ => return reject(400, "exactly one Host header is required", ""),
    }
    match one("sec-websocket-version") {
        Ok(Some(v)) if v.trim_ascii() == b"13" => {}
        _ => {
            return reject(
                426,
                "unsupported WebSocket version; this server speaks 13",
                "Sec-WebSocket-Version: 13\r\n",
            );
        }
    }
    let key = match one("sec-websocket-key") {
        Ok(Some(k)) => k.trim_ascii(),
        _ => return reject(400, "exactly one Sec-WebSocket-Key header is required", ""),
    };
    if BASE64.decode(key).map(|k| k.len()) != Ok(16) {
        return reject(400, "Sec-WebSocket-Key must be 16 bytes in base64", "");
    }
    if !origin_allowed(policy, one("origin")) {
        return reject(403, "origin not allowed", "");
    }
    let forwarded = forwarded(req.headers);
    let credentials = credentials(&path, req.headers);
    let agreed = if policy.deflate {
        deflate::negotiate(
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
                .map(|h| h.value),
        )
    } else {
        None
    };
    let extensions = agreed.as_ref().map_or_else(String::new, |a| {
        format!("Sec-WebSocket-Extensions: {}\r\n", a.response)
    });
    Parsed::Upgrade {
        response: format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n{extensions}\r\n",
            accept_key(key)
        )
        .into_bytes(),
        consumed,
        path,
        forwarded,
        credentials,
        deflate: agreed.map(|a| a.compress),
    }
}

/// Whether `origin` (the request's one Origin header, if exactly one) passes the policy: any
/// origin when the policy lists none, else one of those listed, compared case-insensitively.
fn origin_allowed(policy: &Policy, origin: Result<Option<&[u8]>, ()>) -> bool {
    if policy.allowed_origins.is_empty() {
        return true;
    }
    match origin {
        Ok(Some(o)) => policy
            .allowed_origins
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(o.trim_ascii())),
        _ => false,
    }
}

/// The request's X-Forwarded-For headers, in order, and its X-Real-IP.
fn forwarded(headers: &[httparse::Header<'_>]) -> Forwarded {
    let mut forwarded = Forwarded::default();
    for h in headers {
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded.add_forwarded_for(h.value);
        } else if h.name.eq_ignore_ascii_case("x-real-ip") {
            if forwarded.real_ip.is_some() {
                // Two of them: which one a proxy wrote cannot be told, so neither counts.
                forwarded.real_ip = Some(None);
            } else {
                forwarded.set_real_ip(h.value);
            }
        }
    }
    forwarded
}

/// Sec-WebSocket-Accept for a key (section 4.2.2): base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    BASE64.encode(sha.digest().bytes())
}

/// The value of `name` in the query of `path` (`/x?a=1&b=2`), as sent (not percent-decoded).
pub fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let query = path.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A query value with its `%XX` escapes decoded (as `encodeURIComponent` or Python's
/// `urllib.parse.quote` write them; `+` stays `+`); `None` when an escape is malformed or the
/// result is not UTF-8.
pub fn percent_decoded(value: &str) -> Option<String> {
    if !value.contains('%') {
        return Some(value.to_string());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn reject(status: u16, why: &str, extra: &str) -> Parsed {
    Parsed::Reject {
        response: response(
            status,
            extra,
            "text/plain; charset=utf-8",
            &format!("{why}\n"),
        ),
        status,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A complete HTTP/1.1 response; the connection closes after it.
pub fn response(status: u16, extra_headers: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\n{extra_headers}Content-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )
    .into_bytes()
}

/// 426 for a plain GET of a WebSocket path.
pub fn upgrade_required() -> Vec<u8> {
    response(
        426,
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        "text/plain; charset=utf-8",
        "this is a WebSocket endpoint: connect with a WebSocket client\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "GET /chat?encoding=msgpack HTTP/1.1\r\nHost: server.example.com\r\n\
        Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn status(p: Parsed) -> u16 {
        match p {
            Parsed::Reject { status, .. } => status,
            Parsed::Upgrade { .. } => 101,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rfc_example_key() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        match parse(GOOD.as_bytes(), &Policy::default()) {
            Parsed::Upgrade {
                response,
                consumed,
                path,
                forwarded,
                credentials,
                deflate,
            } => {
                assert_eq!(deflate, None, "not offered back unless --deflate on");
                assert_eq!(consumed, GOOD.len());
                assert!(forwarded.is_empty());
                assert_eq!(credentials, Credentials::None);
                assert_eq!(query_param(&path, "encoding"), Some("msgpack"));
                let r = String::from_utf8(response).unwrap();
                assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_refusal_has_its_status() {
        let p = Policy::default();
        let with = |from: &str, to: &str| GOOD.replace(from, to);
        assert_eq!(status(parse(with("GET", "POST").as_bytes(), &p)), 405);
        assert_eq!(
            status(parse(with("Version: 13", "Version: 8").as_bytes(), &p)),
            426
        );
        assert_eq!(
            status(parse(
                with("dGhlIHNhbXBsZSBub25jZQ==", "short").as_bytes(),
                &p
            )),
            400
        );
        assert_eq!(
            status(parse(
                with("keep-alive, Upgrade", "keep-alive").as_bytes(),
                &p
            )),
            400
        );
        assert_eq!(
            status(parse(
                with("Host: server.example.com\r\n", "").as_bytes(),
                &p
            )),
            400
        );
        assert_eq!(
            status(parse(with("HTTP/1.1", "HTTP/1.0").as_bytes(), &p)),
            400
        );
        assert_eq!(status(parse(with("websocket", "h2c").as_bytes(), &p)), 400);
        assert_eq!(status(parse(b"GARBAGE\r\n\r\n", &p)), 400);
        let strict = Policy {
            deflate: false,
            allowed_origins: vec!["https://app.example.com".into()],
        };
        assert_eq!(status(parse(GOOD.as_bytes(), &strict)), 403);
        let ok = Policy {
            deflate: false,
            allowed_origins: vec!["HTTP://EXAMPLE.COM".into()],
        };
        assert_eq!(status(parse(GOOD.as_bytes(), &ok)), 101);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST));
        assert_eq!(status(parse(long.as_bytes(), &p)), 431);
    }

    #[test]
    fn forwarding_headers_are_collected_in_order_and_a_doubled_real_ip_is_void() {
        let req = GOOD.replace(
            "Origin:",
            "X-Forwarded-For: 6.6.6.6, 203.0.113.9\r\nx-real-ip: 203.0.113.9\r\n\
             X-Forwarded-For: 10.0.0.3\r\nOrigin:",
        );
        let Parsed::Upgrade { forwarded, .. } = parse(req.as_bytes(), &Policy::default()) else {
            panic!("not an upgrade");
        };
        let ips: Vec<_> = forwarded
            .chain
            .iter()
            .map(|a| a.unwrap().to_string())
            .collect();
        assert_eq!(ips, ["6.6.6.6", "203.0.113.9", "10.0.0.3"]);
        assert_eq!(
            forwarded.real_ip,
            Some(Some("203.0.113.9".parse().unwrap()))
        );
        let twice = req.replace("Origin:", "X-Real-IP: 1.1.1.1\r\nOrigin:");
        let Parsed::Upgrade { forwarded, .. } = parse(twice.as_bytes(), &Policy::default()) else {
            panic!("not an upgrade");
        };
        assert_eq!(forwarded.real_ip, Some(None));
    }

    #[test]
    fn permessage_deflate_is_answered_only_when_on_and_offered() {
        let offered = GOOD.replace(
            "Origin:",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nOrigin:",
        );
        let on = Policy {
            deflate: true,
            ..Policy::default()
        };
        let answer = |req: &str, p: &Policy| match parse(req.as_bytes(), p) {
            Parsed::Upgrade {
                response, deflate, ..
            } => (String::from_utf8(response).unwrap(), deflate),
            other => panic!("{other:?}"),
        };
        let (r, d) = answer(&offered, &on);
        assert_eq!(d, Some(true));
        assert!(
            r.contains(
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                 client_no_context_takeover\r\n"
            ),
            "{r}"
        );
        let (r, d) = answer(&offered, &Policy::default());
        assert_eq!(d, None, "off: not agreed");
        assert!(!r.contains("Extensions"), "{r}");
        let (r, d) = answer(GOOD, &on);
        assert_eq!(d, None, "not offered: not agreed");
        assert!(!r.contains("Extensions"), "{r}");
    }

    #[test]
    fn the_token_comes_from_the_query_or_a_bearer_header_and_two_that_differ_conflict() {
        let creds = |path: &str, headers: &str| {
            let req = GOOD
                .replace("/chat?encoding=msgpack", path)
                .replace("Origin:", &format!("{headers}Origin:"));
            match parse(req.as_bytes(), &Policy::default()) {
                Parsed::Upgrade { credentials, .. } => credentials,
                other => panic!("{other:?}"),
            }
        };
        let t = |s: &str| Credentials::Token(s.into());
        assert_eq!(creds("/", ""), Credentials::None);
        assert_eq!(creds("/?a=1&token=abc.def.ghi", ""), t("abc.def.ghi"));
        assert_eq!(creds("/", "Authorization: Bearer abc\r\n"), t("abc"));
        assert_eq!(creds("/", "authorization:   bearer   abc  \r\n"), t("abc"));
        assert_eq!(
            creds("/", "Authorization: Basic Zm9vOmJhcg==\r\n"),
            Credentials::None
        );
        assert_eq!(
            creds("/?token=abc", "Authorization: Bearer abc\r\n"),
            t("abc")
        );
        assert_eq!(
            creds("/?token=abc", "Authorization: Bearer xyz\r\n"),
            Credentials::Conflict
        );
        assert_eq!(creds("/?token=a&token=b", ""), Credentials::Conflict);
        assert_eq!(
            creds(
                "/",
                "Authorization: Bearer abc\r\nAuthorization: Bearer abc\r\n"
            ),
            Credentials::Conflict
        );
    }

    #[test]
    fn partial_requests_wait_and_plain_gets_are_routed() {
        let p = Policy::default();
        assert_eq!(parse(&GOOD.as_bytes()[..40], &p), Parsed::Incomplete);
        assert_eq!(
            parse(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", &p),
            Parsed::Get {
                path: "/healthz".into()
            }
        );
    }

    #[test]
    fn percent_escapes_decode_to_the_name() {
        assert_eq!(percent_decoded("s10-7").as_deref(), Some("s10-7"));
        assert_eq!(
            percent_decoded("team%2F7%20a+b").as_deref(),
            Some("team/7 a+b")
        );
        assert_eq!(percent_decoded("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(percent_decoded("%C3%A"), None); // cut short
        assert_eq!(percent_decoded("%zz"), None);
        assert_eq!(percent_decoded("%FF"), None); // not UTF-8
    }

    proptest! {
        /// Whatever room name a client escapes, every byte of it `%XX` (the most any encoder
        /// escapes), the server reads the same name back.
        #[test]
        fn any_name_escaped_decodes_to_itself(name in "\\PC{1,40}", escape_all in any::<bool>()) {
            let escaped: String = name
                .bytes()
                .map(|b| if escape_all || !b.is_ascii_alphanumeric() {
                    format!("%{b:02X}")
                } else {
                    (b as char).to_string()
                })
                .collect();
            prop_assert_eq!(percent_decoded(&escaped), Some(name));
        }

        #[test]
        fn any_prefix_is_incomplete_or_the_same_answer(cut in 0usize..GOOD.len()) {
            let p = Policy::default();
            prop_assert_eq!(parse(&GOOD.as_bytes()[..cut], &p), Parsed::Incomplete);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes, &Policy::default());
        }

        #[test]
        fn header_case_and_spacing_do_not_matter(upper in any::<bool>(), spaces in 0usize..3) {
            let pad = " ".repeat(spaces);
            let mut req = GOOD.replace("Sec-WebSocket-Key:", &format!("sec-websocket-key:{pad}"));
            if upper {
                req = req.replace("Upgrade: websocket", "UPGRADE: WebSocket");
            }
            prop_assert_eq!(status(parse(req.as_bytes(), &Policy::default())), 101);
        }
    }
}
