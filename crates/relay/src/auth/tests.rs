use std::io::Write;

use proptest::prelude::*;

use super::*;

pub(crate) const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-tests";

/// A secret file with these bytes and mode (also for the relay's tests).
pub(crate) fn secret_file(bytes: &[u8], mode: u32) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    f
}

/// A verifier of tokens signed with `file`'s secret (also for the relay's tests).
pub(crate) fn verifier(file: &tempfile::NamedTempFile, leeway_s: u64) -> Verifier {
    let files = KeyFiles {
        secret_file: Some(file.path().to_path_buf()),
        public_key: None,
        leeway_s,
    };
    Verifier::load(&files).unwrap().expect("configured")
}

pub(crate) fn claims(sub: &str, rooms: &[&str], exp: u64) -> Claims {
    Claims {
        sub: sub.into(),
        exp,
        nbf: None,
        rooms: rooms.iter().map(|s| s.to_string()).collect(),
        publish: None,
        send: false,
    }
}

/// A token signed with `alg` and `secret` by jsonwebtoken itself, bypassing `mint`.
fn signed(alg: Algorithm, secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn a_token_made_by_mint_gives_its_grant() {
    let file = secret_file(&[SECRET, b"\n"].concat(), 0o600);
    let v = verifier(&file, 0);
    let mut c = claims("alice", &["call-42", "team-7/*"], now() + 60);
    c.send = true;
    let token = mint(&SigningKey::Secret(file.path().into()), &c).unwrap();
    let g = v.verify(&token).unwrap();
    assert_eq!(&*g.sub, "alice");
    assert!(g.rooms.allows("call-42") && g.rooms.allows("team-7/standup"));
    assert!(!g.rooms.allows("call-43") && !g.rooms.allows("team-70"));
    assert_eq!(g.publish, g.rooms, "publish defaults to the rooms");
    assert!(g.send);
    // The trailing newline is not part of the secret: the bare bytes verify the same token.
    assert!(v.verify(&signed(Algorithm::HS256, SECRET, &c)).is_ok());
}

#[test]
fn every_refusal_has_its_class() {
    let file = secret_file(SECRET, 0o400);
    let v = verifier(&file, 0);
    let good = claims("bob", &["r"], now() + 60);
    assert_eq!(v.verify(""), Err(Refusal::Missing));
    assert_eq!(v.verify("not-a-jwt"), Err(Refusal::Malformed));
    assert_eq!(
        v.verify(&"a".repeat(MAX_TOKEN + 1)),
        Err(Refusal::Malformed)
    );
    let forged = signed(
        Algorithm::HS256,
        b"another secret of at least 32 bytes!!",
        &good,
    );
    assert_eq!(v.verify(&forged), Err(Refusal::Signature));
    // The same secret under another HMAC: refused for the algorithm, not tried.
    let hs384 = signed(Algorithm::HS384, SECRET, &good);
    assert_eq!(v.verify(&hs384), Err(Refusal::Algorithm));
    let payload = b64(&serde_json::to_vec(&good).unwrap());
    let none = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
    assert_eq!(v.verify(&none), Err(Refusal::Algorithm));
    let none_signed = format!(
        "{}.{payload}.{}",
        b64(br#"{"alg":"none"}"#),
        signed(Algorithm::HS256, SECRET, &good)
            .rsplit('.')
            .next()
            .unwrap()
    );
    assert_eq!(v.verify(&none_signed), Err(Refusal::Algorithm));
    // EdDSA is refused when no public key is configured, whatever the signature.
    let eddsa = format!("{}.{payload}.AAAA", b64(br#"{"alg":"EdDSA"}"#));
    assert_eq!(v.verify(&eddsa), Err(Refusal::Algorithm));
    let expired = signed(Algorithm::HS256, SECRET, &claims("bob", &["r"], now() - 5));
    assert_eq!(v.verify(&expired), Err(Refusal::Expired));
    let mut early = claims("bob", &["r"], now() + 600);
    early.nbf = Some(now() + 300);
    assert_eq!(
        v.verify(&signed(Algorithm::HS256, SECRET, &early)),
        Err(Refusal::NotYetValid)
    );
    let bad_pattern = signed(
        Algorithm::HS256,
        SECRET,
        &claims("bob", &["a*b"], now() + 60),
    );
    assert_eq!(v.verify(&bad_pattern), Err(Refusal::Malformed));
    let no_sub = signed(Algorithm::HS256, SECRET, &claims("", &["r"], now() + 60));
    assert_eq!(v.verify(&no_sub), Err(Refusal::Malformed));
    let no_exp = format!(
        "{}.{}.x",
        b64(br#"{"alg":"HS256"}"#),
        b64(br#"{"sub":"bob","rooms":["r"]}"#)
    );
    assert!(v.verify(&no_exp).is_err());
}

#[test]
fn the_leeway_forgives_a_little_skew_and_no_more() {
    let file = secret_file(SECRET, 0o600);
    let v = verifier(&file, 30);
    let just_expired = signed(Algorithm::HS256, SECRET, &claims("c", &[], now() - 10));
    let g = v.verify(&just_expired).expect("within the leeway");
    assert!(!v.expired(&g, now()));
    assert!(v.expired(&g, now() + 25));
    let long_expired = signed(Algorithm::HS256, SECRET, &claims("c", &[], now() - 60));
    assert_eq!(v.verify(&long_expired), Err(Refusal::Expired));
}

#[test]
fn a_secret_others_can_read_or_too_short_is_refused_with_the_file_named() {
    let loose = secret_file(SECRET, 0o640);
    let files = KeyFiles {
        secret_file: Some(loose.path().into()),
        ..KeyFiles::default()
    };
    let e = Verifier::load(&files).unwrap_err();
    assert!(
        e.contains("mode 0640") && e.contains(&loose.path().display().to_string()),
        "{e}"
    );
    let short = secret_file(b"short\n", 0o600);
    let files = KeyFiles {
        secret_file: Some(short.path().into()),
        ..KeyFiles::default()
    };
    let e = Verifier::load(&files).unwrap_err();
    assert!(e.contains("at least 32"), "{e}");
    assert!(
        Verifier::load(&KeyFiles::default()).unwrap().is_none(),
        "open without keys"
    );
}

#[test]
fn patterns_say_exactly_what_they_allow() {
    assert_eq!(
        Pattern::parse("call-42"),
        Ok(Pattern::Exact("call-42".into()))
    );
    assert_eq!(
        Pattern::parse("team-7/*"),
        Ok(Pattern::Prefix("team-7/".into()))
    );
    assert_eq!(Pattern::parse("*"), Ok(Pattern::Prefix("".into())));
    assert!(Pattern::parse("").is_err());
    assert!(Pattern::parse("a*b").is_err());
    assert!(Pattern::parse("**").is_err());
    assert!(Pattern::parse(&"x".repeat(MAX_ROOM_NAME + 1)).is_err());
    let all = Patterns::parse(&["*".into()]).unwrap();
    assert!(all.allows("anything") && all.allows(""));
    assert!(!Patterns::default().allows("r"), "no patterns, no rooms");
    let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| i.to_string()).collect();
    assert!(Patterns::parse(&many).is_err());
}

proptest! {
    /// A pattern without '*' allows exactly its own name; with a trailing '*', exactly the
    /// names it begins; what parses prints back to the same text.
    #[test]
    fn patterns_match_as_documented(body in "[a-z0-9/_.-]{0,20}", room in "[a-z0-9/_.-]{0,24}") {
        if !body.is_empty() {
            let exact = Pattern::parse(&body).unwrap();
            prop_assert_eq!(exact.matches(&room), room == body);
            prop_assert_eq!(exact.to_string(), body.clone());
        }
        let prefixed = format!("{body}*");
        let prefix = Pattern::parse(&prefixed).unwrap();
        prop_assert_eq!(prefix.matches(&room), room.starts_with(&body));
        prop_assert_eq!(prefix.to_string(), prefixed);
    }

    /// Any text either parses into a pattern that prints back to it, or is refused; never a
    /// panic, and a '*' before the end is always refused.
    #[test]
    fn any_text_parses_back_or_is_refused(s in "\\PC{0,40}") {
        match Pattern::parse(&s) {
            Ok(p) => prop_assert_eq!(p.to_string(), s),
            Err(_) => {
                let body = s.strip_suffix('*').unwrap_or(&s);
                prop_assert!(s.is_empty() || body.contains('*') || body.len() > MAX_ROOM_NAME);
            }
        }
    }

    /// Garbage is never a grant, and never a panic.
    #[test]
    fn garbage_tokens_are_refused(s in "[A-Za-z0-9_.-]{0,200}") {
        let file = secret_file(SECRET, 0o600);
        prop_assert!(verifier(&file, 0).verify(&s).is_err());
    }

    /// Any one character of a valid token changed to another base64url character makes it
    /// refused: header, claims and signature are all covered by the signature.
    #[test]
    fn one_changed_character_breaks_a_token(pos in 0usize..1000, c in "[A-Za-z0-9_-]") {
        let file = secret_file(SECRET, 0o600);
        let v = verifier(&file, 0);
        let token = signed(Algorithm::HS256, SECRET, &claims("dave", &["room-*"], now() + 600));
        let pos = pos % token.len();
        let c = c.chars().next().unwrap();
        prop_assume!(token.as_bytes()[pos] != b'.' && token.as_bytes()[pos] != c as u8);
        let mut changed = token.into_bytes();
        changed[pos] = c as u8;
        let changed = String::from_utf8(changed).unwrap();
        prop_assert!(v.verify(&changed).is_err(), "{changed}");
    }
}
