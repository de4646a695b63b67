//! The upgrade request's extra headers: `-H 'Name: value'` (Origin, Authorization, cookies,
//! whatever a deployment checks), and the relay's token from `--token` or `--token-file` as
//! `Authorization: Bearer`. Checked once, before anything runs: a header that would break the
//! request or take over the handshake's own headers is bad input (exit 2), never sent.

use std::path::Path;

use crate::args::{BadArguments, LoadArgs};

/// What every connection adds to its upgrade request.
#[derive(Clone, Debug, Default)]
pub struct Extra {
    /// Replaces the URL's `host[:port]` in the Host header (`-H 'Host: ...'`).
    pub host: Option<String>,
    /// Whole header lines, each ending in CRLF.
    pub lines: String,
}

/// Headers the WebSocket handshake itself writes (RFC 6455 section 4.1), or that would change
/// how the request is framed: not the user's to set.
const OWNED: &[(&str, &str)] = &[
    ("upgrade", "the handshake sets it"),
    ("connection", "the handshake sets it"),
    ("sec-websocket-key", "the handshake sets it"),
    ("sec-websocket-version", "the handshake sets it"),
    ("sec-websocket-extensions", "use --deflate"),
    ("content-length", "an upgrade request has no body"),
    ("transfer-encoding", "an upgrade request has no body"),
];

/// RFC 9110's token characters, which a header name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value: visible ASCII, spaces and tabs, or UTF-8 beyond ASCII (obs-text); no CR, LF
/// or other control character, which would end the line or the request early.
fn is_field_value(v: &str) -> bool {
    v.bytes()
        .all(|b| b == b'\t' || b == b' ' || (b > 0x20 && b != 0x7f))
}

/// The extra headers for `args`, or why they are refused.
pub fn extra(args: &LoadArgs) -> Result<Extra, BadArguments> {
    let bad = |m: String| Err(BadArguments(m));
    let mut out = Extra::default();
    let mut authorization = false;
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            return bad(format!("-H {h:?}: expected 'Name: value'"));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return bad(format!("-H {h:?}: {name:?} is not a header name"));
        }
        if !is_field_value(value) {
            return bad(format!(
                "-H {h:?}: the value has a control character (CR, LF, ...)"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if let Some((_, why)) = OWNED.iter().find(|(n, _)| *n == lower) {
            return bad(format!("-H {h:?}: {name} is not settable: {why}"));
        }
        match lower.as_str() {
            "host" => out.host = Some(value.to_string()),
            _ => {
                authorization |= lower == "authorization";
                out.lines.push_str(&format!("{name}: {value}\r\n"));
            }
        }
    }
    if let Some(token) = token(args)? {
        if authorization {
            return bad("-H 'Authorization: ...' and --token/--token-file both set it".into());
        }
        out.lines
            .push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    Ok(out)
}

/// The token of `--token`, or the first line of `--token-file` (surrounding whitespace
/// trimmed), which keeps it out of the process list and the shell's history.
fn token(args: &LoadArgs) -> Result<Option<String>, BadArguments> {
    let (token, from) = match (&args.token, &args.token_file) {
        (Some(_), Some(_)) => {
            return Err(BadArguments(
                "--token and --token-file: give one of them".into(),
            ));
        }
        (Some(t), None) => (t.trim().to_string(), "--token".to_string()),
        (None, Some(path)) => (
            read_token(path)?,
            format!("--token-file {}", path.display()),
        ),
        (None, None) => return Ok(None),
    };
    if token.is_empty() || !is_field_value(&token) || token.contains([' ', '\t']) {
        return Err(BadArguments(format!(
            "{from}: a token is one word of visible characters"
        )));
    }
    Ok(Some(token))
}

fn read_token(path: &Path) -> Result<String, BadArguments> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadArguments(format!("--token-file {}: {e}", path.display())))?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    fn args(extra: &[&str]) -> LoadArgs {
        let mut argv = vec!["load", "ws://127.0.0.1:1/"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).load
    }

    #[test]
    fn headers_become_lines_and_host_replaces_the_urls() {
        let e = extra(&args(&[
            "-H",
            "Origin: https://app.example",
            "-H",
            "Cookie:  sid=1; theme=dark ",
            "-H",
            "Host: chat.example:443",
            "--token",
            "abc.def.ghi",
        ]))
        .unwrap();
        assert_eq!(
            e.lines,
            "Origin: https://app.example\r\nCookie: sid=1; theme=dark\r\n\
             Authorization: Bearer abc.def.ghi\r\n"
        );
        assert_eq!(e.host.as_deref(), Some("chat.example:443"));
    }

    #[test]
    fn headers_that_would_break_the_request_are_refused() {
        for (h, why) in [
            ("Origin", "expected 'Name: value'"),
            ("Bad Name: x", "is not a header name"),
            (": x", "is not a header name"),
            ("X-A: 1\r\nX-B: 2", "control character"),
            ("Upgrade: h2c", "the handshake sets it"),
            ("sec-websocket-extensions: x", "use --deflate"),
            ("Content-Length: 5", "no body"),
        ] {
            let e = extra(&args(&["-H", h])).unwrap_err().0;
            assert!(e.starts_with(&format!("-H {h:?}: ")), "{e}");
            assert!(e.contains(why), "{h}: {e}");
        }
        let both = args(&["-H", "Authorization: Basic eA==", "--token", "t"]);
        assert!(extra(&both).unwrap_err().0.contains("both set it"));
    }

    #[test]
    fn a_token_file_gives_its_first_line_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("token");
        std::fs::write(&good, "  abc.def  \nignored\n").unwrap();
        let e = extra(&args(&["--token-file", good.to_str().unwrap()])).unwrap();
        assert_eq!(e.lines, "Authorization: Bearer abc.def\r\n");
        let missing = dir.path().join("missing");
        let err = extra(&args(&["--token-file", missing.to_str().unwrap()]))
            .unwrap_err()
            .0;
        assert!(
            err.starts_with(&format!("--token-file {}: ", missing.display())),
            "{err}"
        );
        std::fs::write(&good, "\n").unwrap();
        let err = extra(&args(&["--token-file", good.to_str().unwrap()]))
            .unwrap_err()
            .0;
        assert!(err.contains("one word"), "{err}");
        let err = extra(&args(&["--token", "a", "--token-file", "x"]))
            .unwrap_err()
            .0;
        assert!(err.contains("give one of them"), "{err}");
    }
}
