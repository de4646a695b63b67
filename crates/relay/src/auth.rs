//! Who may connect, join, publish and send: signed tokens (JWT, RFC 7519).
//!
//! With `--auth-secret-file` (HMAC-SHA256) and/or `--auth-public-key` (Ed25519 or RSA, for
//! issuers that keep the private key elsewhere), every upgrade needs a token, passed as
//! `?token=` or `Authorization: Bearer`. Signatures are checked by `jsonwebtoken` (on ring, the
//! same crypto rustls already brings), never by hand. The algorithm is pinned by the key that
//! is configured, not chosen by the token: HS256 for the secret, EdDSA or RS256 for the public
//! key; a token naming any other algorithm, `none` included, is refused before any key is used.
//!
//! A verified token becomes a `Grant`: the user (`sub`), the room patterns it may join
//! (`rooms`) and publish to (`publish`, by default the same), whether it may send direct
//! messages (`send`), and when it ends (`exp`). Patterns are a room name, or a prefix ending in
//! `*` (`team-7/*`; `*` alone is every room); a `*` anywhere else makes the token malformed, so
//! what a claim allows is never a guess.
//!
//! This module decides; the transport asks it at the upgrade (401 on refusal), the relay asks
//! the grant at every join, publish and send, and at a `refresh`.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use super::protocol::MAX_ROOM_NAME;

/// Longest token taken (bytes). A request is at most 8 KiB anyway; this keeps a token in a
/// query string or a refresh message from costing more than a header could.
pub const MAX_TOKEN: usize = 4096;
/// Longest `sub` (it is shown in logs and sent with every message the user publishes).
pub const MAX_SUB: usize = 256;
/// Most patterns in `rooms` or in `publish`.
pub const MAX_PATTERNS: usize = 64;
/// Seconds of clock skew allowed on `exp` and `nbf` unless configured.
pub const DEFAULT_LEEWAY_S: u64 = 30;

/// Why a token was refused: the class said in the 401 (nothing more) and counted by label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token in the query or the Authorization header.
    Missing,
    /// Not a JWT, not base64url, not JSON, claims of the wrong shape, too long, or a room
    /// pattern that is not one.
    Malformed,
    /// An algorithm other than the configured key's (`none` included).
    Algorithm,
    /// The signature does not verify with the configured key.
    Signature,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// A token in the query and another in the Authorization header, or two headers.
    Conflict,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Missing,
        Refusal::Malformed,
        Refusal::Algorithm,
        Refusal::Signature,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::Conflict,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Algorithm => "algorithm",
            Refusal::Signature => "signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::Conflict => "conflict",
        }
    }

    pub fn index(self) -> usize {
        Refusal::ALL
            .iter()
            .position(|r| *r == self)
            .expect("listed")
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One room pattern of a claim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// This room only.
    Exact(Box<str>),
    /// Every room whose name starts with this (`team-7/` from `team-7/*`; empty from `*`).
    Prefix(Box<str>),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let (body, prefix) = match s.strip_suffix('*') {
            Some(body) => (body, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(format!(
                "room pattern {s:?}: '*' may only end a pattern (\"team-7/*\")"
            ));
        }
        if s.is_empty() {
            return Err("an empty room pattern".into());
        }
        if body.len() > MAX_ROOM_NAME {
            return Err(format!("room pattern {s:?} is longer than a room name"));
        }
        Ok(if prefix {
            Pattern::Prefix(body.into())
        } else {
            Pattern::Exact(body.into())
        })
    }

    pub fn matches(&self, room: &str) -> bool {
        match self {
            Pattern::Exact(name) => **name == *room,
            Pattern::Prefix(p) => room.starts_with(&**p),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// A claim's patterns: a room is allowed when any of them matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Patterns(Box<[Pattern]>);

impl Patterns {
    pub fn parse(list: &[String]) -> Result<Patterns, String> {
        if list.len() > MAX_PATTERNS {
            return Err(format!("more than {MAX_PATTERNS} room patterns"));
        }
        list.iter()
            .map(|s| Pattern::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| Patterns(v.into()))
    }

    pub fn allows(&self, room: &str) -> bool {
        self.0.iter().any(|p| p.matches(room))
    }
}

/// What a verified token allows. Shared by `Arc` between a connection and the relay's
/// per-loop table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The user, as the token's issuer names them.
    pub sub: Arc<str>,
    pub rooms: Patterns,
    pub publish: Patterns,
    pub send: bool,
    /// Seconds since the epoch when the token ends (the connection is closed then, with
    /// `CLOSE_EXPIRED`, unless a `refresh` brought a later one).
    pub exp: u64,
}

/// The close code of a connection whose token expired (4000-4999 is for applications,
/// RFC 6455 section 7.4.2).
pub const CLOSE_EXPIRED: u16 = 4001;

/// The claims tunegate reads; others (`iat`, `iss`, `aud`, `jti`, ...) are ignored.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub rooms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    #[serde(default)]
    pub send: bool,
}

impl Claims {
    fn into_grant(self) -> Result<Grant, String> {
        if self.sub.is_empty() || self.sub.len() > MAX_SUB {
            return Err(format!("sub must be 1..={MAX_SUB} bytes"));
        }
        let rooms = Patterns::parse(&self.rooms)?;
        let publish = match &self.publish {
            Some(list) => Patterns::parse(list)?,
            None => rooms.clone(),
        };
        Ok(Grant {
            sub: Arc::from(self.sub),
            rooms,
            publish,
            send: self.send,
            exp: self.exp,
        })
    }
}

/// The keys tokens are verified with, and how strictly.
pub struct Verifier {
    secret: Option<DecodingKey>,
    /// The public key and the one algorithm it verifies (EdDSA or RS256).
    public: Option<(DecodingKey, Algorithm)>,
    leeway: u64,
    /// What the start-up line says about the keys.
    pub description: String,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// What `--auth-*` says, before the files are read.
#[derive(Clone, Debug, Default)]
pub struct KeyFiles {
    pub secret_file: Option<PathBuf>,
    pub public_key: Option<PathBuf>,
    pub leeway_s: u64,
}

impl Verifier {
    /// Reads the configured key files. `Ok(None)`: none configured, the server is open.
    pub fn load(files: &KeyFiles) -> Result<Option<Verifier>, String> {
        let secret = match &files.secret_file {
            Some(path) => Some(DecodingKey::from_secret(&read_secret(path)?)),
            None => None,
        };
        let public = match &files.public_key {
            Some(path) => Some(read_public_key(path)?),
            None => None,
        };
        let mut algs = Vec::new();
        if let Some(path) = &files.secret_file {
            algs.push(format!("HS256 with the secret in {}", path.display()));
        }
        if let (Some(path), Some((_, alg))) = (&files.public_key, &public) {
            algs.push(format!("{alg:?} with the public key in {}", path.display()));
        }
        if algs.is_empty() {
            return Ok(None);
        }
        Ok(Some(Verifier {
            secret,
            public,
            leeway: files.leeway_s,
            description: algs.join(", "),
        }))
    }

    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// The grant of a token, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Grant, Refusal> {
        if token.is_empty() {
            return Err(Refusal::Missing);
        }
        if token.len() > MAX_TOKEN {
            return Err(Refusal::Malformed);
        }
        let alg = header_alg(token)?;
        let key = match alg {
            "HS256" => self.secret.as_ref(),
            "EdDSA" => self
                .public
                .as_ref()
                .filter(|(_, a)| *a == Algorithm::EdDSA)
                .map(|(k, _)| k),
            "RS256" => self
                .public
                .as_ref()
                .filter(|(_, a)| *a == Algorithm::RS256)
                .map(|(k, _)| k),
            _ => None,
        };
        let (Some(key), Ok(algorithm)) = (key, alg.parse::<Algorithm>()) else {
            return Err(Refusal::Algorithm);
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::InvalidSignature => Refusal::Signature,
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::InvalidAlgorithm => Refusal::Algorithm,
            _ => Refusal::Malformed,
        })?;
        data.claims.into_grant().map_err(|_| Refusal::Malformed)
    }

    /// Whether a grant has run out at `now` (seconds since the epoch), leeway included.
    pub fn expired(&self, grant: &Grant, now: u64) -> bool {
        now > grant.exp.saturating_add(self.leeway)
    }
}

/// The `alg` of a token's header, read only to choose the key (and to refuse an algorithm
/// nobody configured before anything else is done with the token).
fn header_alg(token: &str) -> Result<&'static str, Refusal> {
    let header = token.split('.').next().ok_or(Refusal::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Refusal::Malformed)?;
    #[derive(Deserialize)]
    struct H {
        alg: String,
    }
    let h: H = serde_json::from_slice(&bytes).map_err(|_| Refusal::Malformed)?;
    Ok(match h.alg.as_str() {
        "HS256" => "HS256",
        "EdDSA" => "EdDSA",
        "RS256" => "RS256",
        _ => return Err(Refusal::Algorithm),
    })
}

/// The shared secret: the file's bytes, one trailing newline dropped (so `echo` and editors
/// make the same secret as `head -c 32 /dev/urandom | base64`). The file must not be readable
/// by group or others, nor writable by others: a secret anyone on the host can read is none.
fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the token secret {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o044 != 0 || mode & 0o002 != 0 {
        return Err(format!(
            "the token secret {} has mode {mode:04o}: it must not be readable by group or \
             others (chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    let mut bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the token secret {}: {e}", path.display()))?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.len() < 32 {
        return Err(format!(
            "the token secret {} has {} bytes: HS256 needs at least 32 (RFC 7518 section 3.2)",
            path.display(),
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// A PEM public key: Ed25519 (EdDSA) or RSA (RS256).
fn read_public_key(path: &Path) -> Result<(DecodingKey, Algorithm), String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read the token public key {}: {e}", path.display()))?;
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    Err(format!(
        "{} is not a PEM Ed25519 or RSA public key",
        path.display()
    ))
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How `tunegate token` signs.
pub enum SigningKey {
    /// HS256 with the secret in this file (the same file the server reads).
    Secret(PathBuf),
    /// EdDSA or RS256 with this PEM private key.
    Private(PathBuf),
}

/// A signed token with these claims.
pub fn mint(key: &SigningKey, claims: &Claims) -> Result<String, String> {
    let (header, key) = match key {
        SigningKey::Secret(path) => (
            Header::new(Algorithm::HS256),
            EncodingKey::from_secret(&read_secret(path)?),
        ),
        SigningKey::Private(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read the private key {}: {e}", path.display()))?;
            if let Ok(k) = EncodingKey::from_ed_pem(&pem) {
                (Header::new(Algorithm::EdDSA), k)
            } else if let Ok(k) = EncodingKey::from_rsa_pem(&pem) {
                (Header::new(Algorithm::RS256), k)
            } else {
                return Err(format!(
                    "{} is not a PEM Ed25519 or RSA private key",
                    path.display()
                ));
            }
        }
    };
    // What the server would refuse is refused here, with the reason.
    Patterns::parse(&claims.rooms)?;
    if let Some(p) = &claims.publish {
        Patterns::parse(p)?;
    }
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| format!("cannot sign: {e}"))
}

#[cfg(test)]
pub(crate) mod tests;
