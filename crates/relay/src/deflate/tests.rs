use proptest::prelude::*;

use super::*;

fn offer(values: &[&str]) -> Option<Agreed> {
    negotiate(values.iter().map(|v| v.as_bytes()))
}

const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[test]
fn what_browsers_and_libraries_offer_is_accepted_without_context_takeover() {
    // Chrome, Firefox, Python websockets, Node ws all send this (or with a window value).
    for o in [
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits=15",
        "PERMESSAGE-DEFLATE;CLIENT_MAX_WINDOW_BITS",
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    ] {
        let a = offer(&[o]).unwrap_or_else(|| panic!("{o} declined"));
        assert_eq!(
            a.response, BOTH,
            "{o}: never a client_max_window_bits not asked about"
        );
        assert!(a.compress, "{o}");
    }
}

#[test]
fn a_smaller_server_window_is_kept_by_not_compressing() {
    for bits in 8..=15u8 {
        let a = offer(&[&format!(
            "permessage-deflate; server_max_window_bits={bits}"
        )])
        .unwrap();
        assert_eq!(a.response, format!("{BOTH}; server_max_window_bits={bits}"));
        assert_eq!(a.compress, bits == 15, "{bits}");
    }
    let a = offer(&["permessage-deflate; server_max_window_bits=\"12\""]).unwrap();
    assert!(a.response.ends_with("server_max_window_bits=12"));
}

#[test]
fn offers_that_cannot_be_honoured_are_declined_and_the_next_one_is_taken() {
    for bad in [
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; client_max_window_bits=99",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; x_unknown",
        "x-webkit-deflate-frame",
        "",
    ] {
        assert_eq!(offer(&[bad]), None, "{bad:?}");
    }
    // Several offers, in one header or several: the first acceptable one wins.
    let a =
        offer(&["permessage-deflate; x_unknown, permessage-deflate; server_max_window_bits=10"])
            .unwrap();
    assert!(a.response.ends_with("=10"));
    let a = offer(&[
        "foo, permessage-deflate; server_max_window_bits=9",
        "permessage-deflate",
    ])
    .unwrap();
    assert!(a.response.ends_with("=9"));
    let a = offer(&["permessage-deflate; x_unknown", "permessage-deflate"]).unwrap();
    assert_eq!(a.response, BOTH);
}

#[test]
fn a_compression_bomb_is_cut_at_the_limit_without_being_allocated() {
    let mut c = Codec::default();
    let zeros = vec![0u8; 4 << 20];
    let bomb = c.compress(&zeros).unwrap();
    assert!(bomb.len() < 8 * 1024, "{} bytes", bomb.len());
    let mut out = Vec::new();
    let e = c.inflate(&bomb, 1 << 20, &mut out).unwrap_err();
    assert_eq!((e.code, e.reason), (1009, "message too big"));
    assert!(
        out.capacity() <= 2 * INFLATE_STEP,
        "{} kept",
        out.capacity()
    );
    // The codec is whole after a refusal: the next message inflates.
    let small = c.compress(&b"hello ".repeat(100)).unwrap();
    c.inflate(&small, 1 << 20, &mut out).unwrap();
    assert_eq!(out, b"hello ".repeat(100));
    // Exactly the limit passes.
    let exact = c.compress(&vec![7u8; 1 << 20]).unwrap();
    c.inflate(&exact, 1 << 20, &mut out).unwrap();
    assert_eq!(out.len(), 1 << 20);
    let e = c
        .inflate(&[0xff, 0xff, 0xff], 1 << 20, &mut out)
        .unwrap_err();
    assert_eq!(e.code, 1007);
}

#[test]
fn short_or_incompressible_messages_stay_as_they_are() {
    let mut c = Codec::default();
    assert_eq!(c.compress(b"hi"), None);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    assert_eq!(c.compress(&noise), None);
}

proptest! {
    /// Whatever is compressed inflates back to itself, message after message on one codec
    /// (no context carried from one to the next). Messages are built from a seed: runs of a
    /// few letters (compressible) mixed with random bytes, in any proportion.
    #[test]
    fn every_message_round_trips_on_its_own(
        seed in any::<u64>(),
        shapes in proptest::collection::vec((0usize..6000, 0u64..8), 1..8),
    ) {
        let mut c = Codec::default();
        let mut out = Vec::new();
        let mut x = seed | 1;
        for (len, noise) in shapes {
            let m: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x % 8 < noise { (x >> 32) as u8 } else { b'a' + (x % 3) as u8 }
                })
                .collect();
            if let Some(z) = c.compress(&m) {
                prop_assert!(!z.ends_with(&TAIL));
                c.inflate(&z, 1 << 20, &mut out).unwrap();
                prop_assert_eq!(&out, &m);
            }
        }
    }

    /// Any bytes as compressed input: an error or a message, never a panic or more than the
    /// limit.
    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut c = Codec::default();
        let mut out = Vec::new();
        if c.inflate(&data, 4096, &mut out).is_ok() {
            prop_assert!(out.len() <= 4096);
        }
    }
}
